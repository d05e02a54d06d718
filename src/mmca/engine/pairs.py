"""Batched pair scoring on precomputed banks: only the pair-dependent work of the cross unit.

For P pairs (image a_p, caption b_p) of one caption length bucket L:

  region rows:  logits = [Q_r K_rᵀ | Q_r K_eᵀ]; the first block's softmax statistics come from
                the image bank, the second is computed here, the two are merged with the
                log-sum-exp rule (max, rescaled sums, rescaled exp-weighted V);
  token rows:   logits = [Q_e K_eᵀ | Q_e K_rᵀ]; likewise, the own block's statistics derived
                here from the caption's Q/K/V (an L x L block: cheap, and not worth its
                memory in the bank);

the logits of both are laid out key-major (`bank.key_logits`: the softmax reductions run
over dim -2, along the queries) with padded keys at -inf from the product's accumulator; then
the output projection, residual + LayerNorm, FFN, residual + LayerNorm on the k region
rows and the L token rows (never concatenated), the mean of the region rows -> i1, and the
cross text CNN head on the token rows, its three convolutions done as one matrix product with
every tap of every window followed by shifted adds -> c1. S = i0·c0 + α·i1·c1.

Every call works on the same shapes for a given pair (its caption's bucket length; the row
count is padded to a fixed multiple), so a pair gets the same float score in whichever block it
is computed: the pruned and the exhaustive modes agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmca.engine.bank import ImageBank, TextBucket, key_logits, max_over, own_stats


class CrossWeights:
    """The cross unit's and cross text head's weights laid out for the pair kernel, in one
    dtype (float32, or bfloat16 for the fast approximate mode)."""

    def __init__(self, model, dtype: torch.dtype = torch.float32):
        unit, head = model.cross_unit, model.cross_text_head
        cast = lambda t: t.detach().to(dtype).contiguous()  # noqa: E731
        self.dtype = dtype
        self.alpha = float(model.alpha)
        self.heads, self.d = unit.heads, unit.d
        self.out_w, self.out_b = cast(unit.out.weight.t()), cast(unit.out.bias)
        self.ffn1_w, self.ffn1_b = cast(unit.ffn1.weight.t()), cast(unit.ffn1.bias)
        self.ffn2_w, self.ffn2_b = cast(unit.ffn2.weight.t()), cast(unit.ffn2.bias)
        self.norm1 = (cast(unit.norm1.weight), cast(unit.norm1.bias), unit.norm1.eps)
        self.norm2 = (cast(unit.norm2.weight), cast(unit.norm2.bias), unit.norm2.eps)
        # conv taps: window w has taps s = 0..w-1; tap weight (d_in, filters); all taps side by side
        self.windows = tuple(head.windows)
        self.filters = head.convs[0].out_channels
        taps = [conv.weight[:, :, s].t() for conv in head.convs for s in range(conv.kernel_size[0])]
        self.taps_w = cast(torch.cat(taps, dim=1))  # (d, filters * sum(windows))
        self.conv_b = [cast(conv.bias) for conv in head.convs]
        self.fc_w, self.fc_b = cast(head.fc.weight.t()), cast(head.fc.bias)
        ln = head.layer_norm
        self.head_norm = None if ln is None else (cast(ln.weight), cast(ln.bias), ln.eps)


def _merge(q, k, v, key_mask, m0, l0, o0):
    """Attention of queries q (P, h, Lq, dh) over [own keys | other keys k, v (P, h, Lk, dh)]:
    the own block is given by its statistics m0, l0 (P, h, Lq) and o0 (P, h, Lq, dh);
    `key_mask` (P, Lk) bool or None masks the other keys. -> normalised output (P, h, Lq, dh)."""
    logits = key_logits(q, k, key_mask)  # (P, h, Lk, Lq)
    m = torch.maximum(m0, max_over(logits, -2).float())
    p = logits.sub_(m.unsqueeze(-2).to(logits.dtype)).exp_()  # in place: one pass, no allocation
    w0 = torch.exp(m0 - m)  # rescale of the own block
    den = l0 * w0 + p.sum(dim=-2, dtype=torch.float32)
    num = torch.baddbmm(
        (o0 * w0.unsqueeze(-1).to(o0.dtype)).flatten(0, 1), p.flatten(0, 1).transpose(1, 2), v.flatten(0, 1)
    ).view_as(o0)
    return num / den.unsqueeze(-1).to(num.dtype)


def _ffn_block(w: CrossWeights, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """Output projection, residual + LN, FFN, residual + LN on rows (P, L, d)."""
    d = w.d
    # residual + bias first, then the product accumulated into it in place (addmm_ with beta 1):
    # one pass over the rows fewer than addmm's copy of the bias followed by the residual add
    x = F.layer_norm((x + w.out_b).view(-1, d).addmm_(attended.reshape(-1, d), w.out_w).view_as(x), (d,), *w.norm1)
    h = torch.addmm(w.ffn1_b, x.reshape(-1, d), w.ffn1_w).relu_()
    return F.layer_norm((x + w.ffn2_b).view(-1, d).addmm_(h, w.ffn2_w).view_as(x), (d,), *w.norm2)


def _text_head(w: CrossWeights, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross CNN head on token rows y (P, L, d) (padded rows already zero) -> c1 (P, d)."""
    p_, length, d = y.shape
    f = w.filters
    z = (y.reshape(-1, d) @ w.taps_w).view(p_, length, -1)  # (P, L, f * taps)
    not_real = ~mask.unsqueeze(-1)
    pooled, col = [], 0
    for width, bias in zip(w.windows, w.conv_b):
        acc = z[:, :, col:col + f]  # the first tap's columns
        for s in range(1, min(width, length)):  # tap s reads row t + s; zero past the end
            acc = acc + F.pad(z[:, s:, col + s * f:col + (s + 1) * f], (0, 0, 0, s))
        col += width * f
        # max over the real positions, then the bias (max(a + b) = max(a) + b, exactly: rounding
        # is monotone) and ReLU (monotone, so the same as ReLU then max)
        pooled.append(acc.masked_fill(not_real, float("-inf")).amax(dim=1).add_(bias).relu_())
    c = torch.addmm(w.fc_b, torch.cat(pooled, dim=-1), w.fc_w).float()
    if w.head_norm is not None:
        g, b, eps = w.head_norm
        c = F.layer_norm(c, (c.shape[-1],), g.float(), b.float(), eps)
    return F.normalize(c, dim=-1)


def pair_flops(k: int, length: int, d: int, ffn: int, filters: int, windows: tuple[int, ...]) -> int:
    """Floating-point operations of one pair in `score_block` (multiply-adds count 2), counting
    the matrix products only (softmax, norms and adds are a few percent): the cross attention
    blocks (region rows over tokens, token rows over their own tokens and the regions), the
    output projection and FFN on k + L rows, and the text head's taps and FC."""
    attention = 2 * 2 * k * length * d + 2 * 2 * length * (length + k) * d
    rows = (k + length) * (2 * d * d + 2 * 2 * d * ffn)
    head = 2 * length * d * filters * sum(windows) + 2 * filters * len(windows) * d
    return attention + rows + head


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    p_, h, length, dh = x.shape
    return x.transpose(1, 2).reshape(p_, length, h * dh)


@dataclass
class BlockRows:
    """The bank rows one block of pairs reads, gathered and cast to the kernel's dtype: shapes
    depend only on the block (pairs, regions, bucket length), never on the banks' sizes, so a
    compiled kernel (`mmca.engine.fused`) sees one shape per caption length bucket."""

    qr: torch.Tensor  # (P, h, k, dh) image rows
    kr: torch.Tensor
    vr: torch.Tensor
    m: torch.Tensor  # (P, h, k) float32 own-block statistics of the image rows
    l: torch.Tensor
    o: torch.Tensor
    r: torch.Tensor  # (P, k, d)
    qe: torch.Tensor  # (P, h, L, dh) caption rows
    ke: torch.Tensor
    ve: torch.Tensor
    mask: torch.Tensor  # (P, L) bool
    e: torch.Tensor  # (P, L, d)


def gather_rows(w: CrossWeights, images: ImageBank, bucket: TextBucket, a: torch.Tensor,
                b: torch.Tensor) -> BlockRows:
    """The rows of image `a` and bucket row `b` of each pair; bank rows stored in another dtype
    than the kernel's are cast on the way in."""
    def rows(t, idx):
        return t.index_select(0, idx).to(w.dtype)

    return BlockRows(rows(images.q, a), rows(images.k, a), rows(images.v, a),
                     images.m.index_select(0, a), images.l.index_select(0, a), rows(images.o, a),
                     rows(images.r, a), rows(bucket.q, b), rows(bucket.k, b), rows(bucket.v, b),
                     bucket.mask.index_select(0, b), rows(bucket.e, b))


def cross_dots(w: CrossWeights, x: BlockRows) -> torch.Tensor:
    """i1·c1 of the block's pairs -> (P,) float32: everything of the cross unit and its text
    head that depends on the pair."""
    # region rows attend to [own regions (statistics from the bank) | the caption's tokens]
    att_r = _merge(x.qr, x.ke, x.ve, x.mask, x.m, x.l, x.o)
    # token rows attend to [own tokens (statistics derived here) | the image's regions]
    att_e = _merge(x.qe, x.kr, x.vr, None, *own_stats(x.qe, x.ke, x.ve, x.mask))
    y_r = _ffn_block(w, x.r, merge_heads(att_r))
    y_e = _ffn_block(w, x.e, merge_heads(att_e))
    i1 = F.normalize(y_r.float().mean(dim=1), dim=-1)
    y_e = y_e.masked_fill_(~x.mask.unsqueeze(-1), 0)
    c1 = _text_head(w, y_e, x.mask)
    return (i1 * c1).sum(dim=-1)


def global_dots(images: ImageBank, bucket: TextBucket, c0: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
    """i0·c0 of the pairs (image a, bucket row b) -> (P,) float32."""
    cap = bucket.captions.index_select(0, b)
    return (images.i0.index_select(0, a) * c0.index_select(0, cap)).sum(dim=-1)


@torch.no_grad()
def score_block(w: CrossWeights, images: ImageBank, bucket: TextBucket, c0: torch.Tensor,
                a: torch.Tensor, b: torch.Tensor, cross=cross_dots) -> torch.Tensor:
    """S of P pairs: image rows `a` of `images`, rows `b` of `bucket` (both (P,) int64 on the
    bank device); `c0` is the caption bank's (M, d) -> (P,) float32. `cross(w, rows)` computes
    i1·c1 (`cross_dots`, or its compiled form)."""
    g = global_dots(images, bucket, c0, a, b)
    return g + w.alpha * cross(w, gather_rows(w, images, bucket, a, b))
