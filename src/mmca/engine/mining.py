"""Mine, then recompute: the max-violation loss of a batch with gradients through <= 3B pairs
(and the sum-over-negatives loss through the violating pairs only).

The hinge loss of Eq. 15 has a non-zero gradient only through each row's and column's
positive and hardest negative. A no-grad pass with the scoring engine finds them (pruned by the
bound i0·c0 ± α: a negative that cannot beat the best lower bound of its row/column, or cannot
violate the margin at all, is never scored); the differentiable recompute then runs the
model's own batched forward (`model.cross`) on those pairs only, and the loss is computed by
`mmca.loss` on a score matrix holding them (every other entry -inf: it can never be a hardest
negative, so the loss value and every gradient equal those of the full B x B matrix).
Negatives within `tie_tol` of a row's or column's best are all recomputed, so float ties and
near-ties resolve exactly as in the full computation.

The sum over all negatives (the warm-up loss) has a gradient only through the negatives that
violate the margin, so the same scheme applies: mine the violating pairs, recompute those.
Early in training nearly every pair violates; the cost falls as the model separates pairs.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from mmca.dist import Shard
from mmca.engine.bank import bucketed_text_bank, image_bank_from_encoded, pad_tokens, text_bucket_from_encoded
from mmca.engine.scoring import ScoringEngine, inference_mode
from mmca.loss import max_violation_loss, sum_violation_loss


def _plain_pair_scores_grad(model, r, i0, e, c0, mask, a, b):
    """Differentiable S of pairs (a, b): the model's cross unit on each pair as gathered, captions
    padded to the batch's longest (the oracle's way; `_pair_scores_grad` is tested against it)."""
    i1, c1 = model.cross(r[a], e[b], mask[b])
    return (i0[a] * c0[b]).sum(-1) + model.alpha * (i1 * c1).sum(-1)


RECOMPUTE_GRANULE = 8  # caption length buckets of the recompute (measured: 8 beat 4 and 16)


def _pair_scores_grad(model, r, i0, e, c0, mask, a, b, granule: int = RECOMPUTE_GRANULE):
    """Differentiable S of pairs (a, b) via the model's batched cross unit, with two savings
    that change values only by float rounding: each item's Q/K/V is projected once however many
    pairs it is in (the engine's trick, here with grad), and the pairs run in caption length
    buckets, each cut to its bucket's length instead of the batch's longest caption."""
    if not len(a):  # a rank's share of a small global batch can be empty
        return (i0[a] * c0[b]).sum(-1)
    unit = model.cross_unit
    items_a, slot_a = torch.unique(a, return_inverse=True)  # project only the items in use
    items_b, slot_b = torch.unique(b, return_inverse=True)
    qkv_r, qkv_e = unit.qkv(r[items_a]), unit.qkv(e[items_b])
    padded = torch.div(mask.sum(1)[b] + granule - 1, granule, rounding_mode="floor") * granule
    parts, order = [], []
    for length in torch.unique(padded).tolist():
        sel = (padded == length).nonzero().squeeze(1)
        length = min(length, e.shape[1])
        ia, ib = a[sel], b[sel]
        i1, c1 = model.cross(r[ia], e[ib, :length], mask[ib, :length],
                             qkv=(qkv_r[slot_a[sel]], qkv_e[slot_b[sel], :length]))
        parts.append((i1 * c1).sum(-1))
        order.append(sel)
    cross = torch.cat(parts)[torch.argsort(torch.cat(order))]  # back in the order of (a, b)
    return (i0[a] * c0[b]).sum(-1) + model.alpha * cross


def exhaustive_scores(model, regions, tokens, mask, chunk: int = 1024,
                      use_checkpoint: bool = False) -> torch.Tensor:
    """The (B, B) score matrix with autograd through every pair (the B² reference).
    With `use_checkpoint`, each chunk's activations are recomputed in backward (memory bound
    by one chunk; one extra forward)."""
    r, i0 = model.encode_image(regions)
    e, c0 = model.encode_text(tokens, mask)
    if not model.alpha:
        return i0 @ c0.T
    bsz = len(regions)
    a_all = torch.arange(bsz, device=regions.device).repeat_interleave(bsz)
    b_all = torch.arange(bsz, device=regions.device).repeat(bsz)
    parts = []
    for s in range(0, bsz * bsz, chunk):
        a, b = a_all[s:s + chunk], b_all[s:s + chunk]
        if use_checkpoint:
            parts.append(checkpoint(_plain_pair_scores_grad, model, r, i0, e, c0, mask, a, b,
                                    use_reentrant=False))
        else:
            parts.append(_plain_pair_scores_grad(model, r, i0, e, c0, mask, a, b))
    return torch.cat(parts).view(bsz, bsz)


def exhaustive_loss(model, regions, tokens, mask, margin: float = 0.2, same_image=None,
                    kind: str = "max", chunk: int = 1024, use_checkpoint: bool = False) -> torch.Tensor:
    """Back-propagation through all B² pairs: the oracle of `mined_loss` and the baseline of
    the benchmark."""
    scores = exhaustive_scores(model, regions, tokens, mask, chunk, use_checkpoint)
    fn = max_violation_loss if kind == "max" else sum_violation_loss
    return fn(scores, margin, same_image)


def _batch_banks(engine: ScoringEngine, r, i0, e, c0, mask):
    """Image and text banks of one batch from its encoded (detached) items."""
    model = engine.model
    images = image_bank_from_encoded(model, r, i0, engine.storage_dtype)

    def make_bucket(length, members):
        idx = torch.as_tensor(members, device=e.device)
        ee, mm = pad_tokens(e[idx], mask[idx], length)
        return text_bucket_from_encoded(model, ee, c0[idx], mm, idx, engine.storage_dtype)[0]

    texts = bucketed_text_bank(c0.detach().float(), mask.sum(1).cpu().numpy(), engine.length_granule,
                               make_bucket)
    return images, texts


@torch.no_grad()
def mine_pairs(engine: ScoringEngine, images, texts, margin: float, same_image=None,
               kind: str = "max", tie_tol: float | None = None, shard: Shard = Shard(), rounds: int = 2):
    """No-grad pass: -> (pairs (a, b) to recompute incl. the positives, pair passes used).
    kind "max": each row's and column's hardest violating negatives; "sum": every violating
    negative. With a `shard`, each rank scores the candidates of its strip of rows and the
    strips are combined (an element-wise max of -inf-filled matrices): every rank then picks
    the same pairs from the whole matrix. `rounds` 2 (kind "max"): each row's and column's
    best candidate is scored first and its score prunes the rest; 1: every candidate the bound
    admits in one pass. Both give the same hardest negatives and the same loss; the picks may
    differ only by pairs within tie_tol of their row's best that cannot violate that row's
    margin (no gradient either way)."""
    bsz = len(images)
    dev = engine.device
    start = engine.pair_passes
    eye = torch.eye(bsz, dtype=torch.bool, device=dev)
    neg = ~eye if same_image is None else ~(eye | same_image.to(dev))
    ar = torch.arange(bsz, device=dev)
    first, last = shard.span(bsz)  # this rank's strip of rows (all of them in one process)
    pos = shard.join(engine.pair_scores(images, texts, ar[first:last], ar[first:last]), bsz)
    g = images.i0 @ texts.c0.T
    lo, hi = g - engine.slack, g + engine.slack
    ninf = torch.tensor(float("-inf"), device=dev)
    need_row = hi + margin >= pos[:, None]  # may violate the margin of row i
    need_col = hi + margin >= pos[None, :]
    if kind == "max":  # ... and may be its hardest negative
        need_row &= hi >= torch.where(neg, lo, ninf).amax(1, keepdim=True)
        need_col &= hi >= torch.where(neg, lo, ninf).amax(0, keepdim=True)
    if tie_tol is None:  # two scores each within the engine's error of their float32 values
        tie_tol = 2 * engine.score_error
    cand = neg & (need_row | need_col)
    s = torch.full((bsz, bsz), float("-inf"), device=dev)

    def score(pairs):  # this rank's strip of `pairs` into s -> the whole matrix, on every rank
        ii, jj = pairs[first:last].nonzero(as_tuple=True)
        if len(ii):
            s[ii + first, jj] = engine.pair_scores(images, texts, ii + first, jj)
        return torch.where(neg, shard.max(s), ninf)

    for _ in range(rounds - 1 if kind == "max" else 0):
        # Each row's and column's most promising candidate first: its true score is a bar every
        # other candidate of that row (column) must reach within tie_tol to be that row's
        # (column's) hardest negative or tied with it, and it is usually far above the bound's
        # lower end. A pair stays if its row or its column still needs it.
        gc = torch.where(cand, g, ninf)
        top = cand & ((gc == gc.amax(1, keepdim=True)) | (gc == gc.amax(0, keepdim=True)))
        found = score(top)
        row_bar, col_bar = found.amax(1, keepdim=True) - tie_tol, found.amax(0, keepdim=True) - tie_tol
        cand &= ~top & ((need_row & (hi >= row_bar)) | (need_col & (hi >= col_bar)))
    s = score(cand)
    if kind == "max":  # the best negative violates, and s is within tie_tol of it
        row_best, col_best = s.amax(1, keepdim=True), s.amax(0, keepdim=True)
        violate_row = (s >= row_best - tie_tol) & (row_best + margin + tie_tol >= pos[:, None])
        violate_col = (s >= col_best - tie_tol) & (col_best + margin + tie_tol >= pos[None, :])
    else:
        violate_row = s + margin + tie_tol >= pos[:, None]
        violate_col = s + margin + tie_tol >= pos[None, :]
    pick = (neg & (violate_row | violate_col)) | eye
    a, b = pick.nonzero(as_tuple=True)
    return a, b, engine.pair_passes - start


def mined_loss(model, regions, tokens, mask, margin: float = 0.2, same_image=None,
               kind: str = "max", precision: str = "fp32", block_pairs: int | None = None,
               stats: dict | None = None, fused: str | None = None) -> torch.Tensor:
    """The batch loss with the gradient of back-propagating through all B² pairs.

    A no-grad pass with the engine mines the pairs that carry a gradient (kind "max", Eq. 15:
    the hardest negatives, <= 3B pairs with the positives; kind "sum": every negative that
    violates the margin), which are then recomputed with grad. `precision="bf16"` runs only
    the mining pass in bfloat16 (the recompute stays float32; near-ties within the bf16
    tolerance are all recomputed). `stats`, if given, receives pair-pass counts. `fused`: the
    mining engine's fused-kernel switch (`mmca.engine.fused`)."""
    r, i0 = model.encode_image(regions)
    e, c0 = model.encode_text(tokens, mask)
    return loss_from_encodings(model, r, i0, e, c0, mask, margin, same_image, kind, precision,
                               block_pairs, stats, fused=fused)


def loss_from_encodings(model, r, i0, e, c0, mask, margin: float = 0.2, same_image=None, kind: str = "max",
                        precision: str = "fp32", block_pairs: int | None = None, stats: dict | None = None,
                        recompute=_pair_scores_grad, shard: Shard = Shard(),
                        fused: str | None = None) -> torch.Tensor:
    """`mined_loss` from the batch's encodings (R, i0, E', c0: all B items, with grad).
    `recompute(model, r, i0, e, c0, mask, a, b)` gives the differentiable S of the mined pairs
    (a, b) (a data-parallel run splits them over its ranks: `mmca.engine.global_batch`)."""
    if kind not in ("max", "sum"):
        raise ValueError(f"kind must be 'max' or 'sum', not {kind!r}")
    loss_fn = max_violation_loss if kind == "max" else sum_violation_loss
    if not model.alpha:  # S = i0·c0: the whole B x B matrix is one product, nothing to mine
        if stats is not None:
            stats.update(mined_pairs=0, recomputed_pairs=0)
        return loss_fn(i0 @ c0.T, margin, same_image)
    # no weight check: the trainer refuses non-finite gradients instead; no fixed shapes: mining
    # compares within a tie tolerance, and its calls are small (a few pairs per length bucket)
    engine = ScoringEngine(model, device=r.device, precision=precision, block_pairs=block_pairs,
                           check_weights=False, fixed_shape=False, fused=fused)
    with inference_mode(model):
        images, texts = _batch_banks(engine, r, i0, e, c0, mask)
        a, b, passes = mine_pairs(engine, images, texts, margin, same_image, kind, shard=shard)
    bsz = len(r)
    scores = recompute(model, r, i0, e, c0, mask, a, b)
    full = torch.full((bsz, bsz), float("-inf"), device=scores.device, dtype=scores.dtype)
    full = full.index_put((a, b), scores)
    if stats is not None:
        stats.update(mined_pairs=passes, recomputed_pairs=len(a))
    return loss_fn(full, margin, same_image)
