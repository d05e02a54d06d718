"""The hardest-negative loss of one global batch split over the ranks of a process group, with
the loss value and the gradient of one process training on the whole batch.

Each rank encodes its contiguous share of the batch. The per-item encodings (R, i0, E', c0) are
gathered across ranks with autograd (`_AllGather`: its backward returns each rank the summed
gradient of its own rows), so every rank holds the whole batch. Each rank mines
its strip of rows of the B x B matrix (no grad, the engine's pruned pass), the strips are
combined by an element-wise max, and every rank picks the same pairs that carry a gradient from
the whole matrix (row and column hardest negatives); it recomputes with grad only its share of
those pairs, and gathers the recomputed scores, again with autograd. Every rank then
computes the same loss L over the whole batch.

Scale: each rank back-propagates the same L, so the gathers' backward hands every item's owner
W copies of its gradient; the sum of the ranks' parameter gradients is W · dL/dθ, and
`average_gradients` (an all-reduce, then / W) leaves exactly one process's dL/dθ on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmca.dist import Shard
from mmca.engine.mining import _pair_scores_grad, loss_from_encodings


class _AllGather(torch.autograd.Function):
    """all_gather with autograd: the backward sums the gradient of the gathered tensor over the
    ranks (an all-reduce: gloo has no reduce-scatter) and hands each rank the slice of its rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), len(x)
        out = x.new_empty((dist.get_world_size() * len(x), *x.shape[1:]))
        dist.all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's `x` (its sizes[rank] rows) stacked in rank order, with autograd."""
    width = max(sizes)
    if width > len(x):
        x = F.pad(x, (0, 0) * (x.dim() - 1) + (0, width - len(x)))
    gathered = _AllGather.apply(x)
    return torch.cat([gathered[r * width:r * width + n] for r, n in enumerate(sizes)])


def shares(n: int, shard: Shard) -> list[int]:
    """How many of n items each rank holds (contiguous spans, `Shard.span`)."""
    return [e - s for s, e in (Shard(r, shard.world).span(n) for r in range(shard.world))]


def global_mined_loss(model, regions, tokens, mask, shard: Shard, batch_size: int, margin: float = 0.2,
                      same_image=None, kind: str = "max", precision: str = "fp32",
                      stats: dict | None = None, fused: str | None = None) -> torch.Tensor:
    """`mined_loss` of the global batch of `batch_size` items, of which this rank passes its
    share (`Shard.span`): regions (b, k, D_img), tokens (b, n, D_txt) padded to the global
    batch's longest caption, mask (b, n); `same_image` is the global (B, B) mask."""
    sizes = shares(batch_size, shard)
    r, i0 = model.encode_image(regions)
    e, c0 = model.encode_text(tokens, mask)
    i0, c0 = gather_rows(i0, sizes), gather_rows(c0, sizes)
    if model.alpha:  # the cross module needs every item's R and E' (α = 0 needs i0 and c0 only)
        r, e = gather_rows(r, sizes), gather_rows(e, sizes)
        mask = gather_rows(mask.to(torch.uint8), sizes).bool()

    def recompute(model, r, i0, e, c0, mask, a, b):
        s, t = shard.span(len(a))
        part = _pair_scores_grad(model, r, i0, e, c0, mask, a[s:t], b[s:t])
        return gather_rows(part, shares(len(a), shard))

    return loss_from_encodings(model, r, i0, e, c0, mask, margin, same_image, kind, precision,
                               stats=stats, recompute=recompute, shard=shard, fused=fused)


def average_gradients(params, shard: Shard) -> None:
    """Every parameter's gradient: the mean over ranks (one all-reduce of all of them)."""
    grads = [p.grad for p in params if p.grad is not None]
    if shard.world == 1 or not grads:
        return
    flat = shard.sum(torch.cat([g.reshape(-1) for g in grads]))
    flat /= shard.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
