"""Per-item precomputation: everything of the cross unit that depends on one image or one
caption only, computed once per item instead of once per pair.

For an image: R (the FC-projected regions, the residual of the cross unit), i0, the cross
unit's Q/K/V of R, and the softmax statistics of the region-region attention block (row max,
sum of exp, exp-weighted V). For a caption: E', its mask, the cross unit's Q/K/V of E' and c0.
A pair then only needs its two cross blocks (Q_r·K_eᵀ and Q_e·K_rᵀ), merged with the own
blocks by the log-sum-exp rule (`mmca.engine.pairs`).

What a caption does not store, because the pair kernel derives it per block for a fraction of
the pair's cost: the token-token block's softmax statistics (an L x L block, ~1% of a pair's
arithmetic at L ~ 16, against 20% of the whole bank's memory) and the key bias of the padding
(from the mask). An image keeps its statistics: its k x k block is 5x bigger and small in
memory next to the captions'.

Storage dtype: bank tensors are kept in `storage` (default: the compute dtype); the pair
kernel casts the rows of a block to the compute dtype. A lower storage dtype than float32 under
float32 compute is an opt-in approximation (scores move by the rounding of the stored rows;
ranks stay consistent between the engine's modes on the same banks); it is never chosen
implicitly. i0, c0 and the softmax statistics are always float32.

Captions are stored in length buckets: every caption is padded to its bucket's length, always
the same one, so a pair's score is computed with the same shapes whichever block it falls in
(the exact pruned ranks equal the exhaustive ones bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

NEG = float("-inf")
IMAGE_FIELDS = ("r", "i0", "q", "k", "v", "m", "l", "o")
TEXT_FIELDS = ("captions", "e", "mask", "q", "k", "v")


class _Rows:
    """A bank part whose tensors `FIELDS` all have one row per item."""

    FIELDS: tuple[str, ...] = ()

    def __len__(self) -> int:
        return getattr(self, self.FIELDS[0]).shape[0]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(getattr(self, f)) for f in self.FIELDS)


@dataclass
class ImageBank(_Rows):
    """Per-image parts, all (N, ...) on one device. Q is pre-scaled by 1/sqrt(d/h)."""

    FIELDS = IMAGE_FIELDS

    r: torch.Tensor  # (N, k, d) residual input of the cross unit
    i0: torch.Tensor  # (N, d) float32, unit
    q: torch.Tensor  # (N, h, k, dh)
    k: torch.Tensor  # (N, h, k, dh)
    v: torch.Tensor  # (N, h, k, dh)
    m: torch.Tensor  # (N, h, k) float32 row max of the region-region logits
    l: torch.Tensor  # (N, h, k) float32 sum of exp(logit - m)
    o: torch.Tensor  # (N, h, k, dh) exp-weighted V, unnormalised


@dataclass
class TextBucket(_Rows):
    """Captions padded to one common length `length`."""

    FIELDS = TEXT_FIELDS

    length: int
    captions: torch.Tensor  # (Mb,) int64, position of each row in the text bank
    e: torch.Tensor  # (Mb, L, d) E'; zero on padded rows
    mask: torch.Tensor  # (Mb, L) bool, True on real tokens
    q: torch.Tensor  # (Mb, h, L, dh), pre-scaled
    k: torch.Tensor
    v: torch.Tensor


@dataclass
class TextBank:
    """Per-caption parts, grouped by length bucket. `bucket_of[j]`, `row_of[j]` locate
    caption j; `c0` is (M, d) float32 in caption order."""

    c0: torch.Tensor
    lengths: np.ndarray  # (M,) real token counts
    buckets: list[TextBucket]
    bucket_of: np.ndarray  # (M,) int64
    row_of: np.ndarray  # (M,) int64
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.c0.shape[0]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.c0) + sum(b.nbytes for b in self.buckets)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bucket_length(n: int, granule: int) -> int:
    """The padded length of a caption of n tokens: n rounded up to a multiple of `granule`."""
    return int(math.ceil(n / granule) * granule)


def bucketed_text_bank(c0: torch.Tensor, lengths: np.ndarray, granule: int, make_bucket,
                       extra: dict | None = None) -> TextBank:
    """A TextBank of captions with real token counts `lengths`, grouped in length buckets of
    `granule`: make_bucket(length, members) -> the TextBucket of the captions at bank positions
    `members` (ascending) padded to `length`; `c0` (M, d) float32 in bank order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    padded = np.array([bucket_length(int(n), granule) for n in lengths], dtype=np.int64)
    bucket_of = np.zeros(len(lengths), dtype=np.int64)
    row_of = np.zeros(len(lengths), dtype=np.int64)
    buckets = []
    for length in np.unique(padded):
        members = np.nonzero(padded == length)[0]
        bucket_of[members] = len(buckets)
        row_of[members] = np.arange(len(members))
        buckets.append(make_bucket(int(length), members))
    return TextBank(c0, lengths, buckets, bucket_of, row_of, extra=extra or {})


def project_qkv(unit, x: torch.Tensor):
    """The cross unit's Q (pre-scaled by 1/sqrt(d/h)), K, V of rows x (B, L, d), each as a
    (B, h, L, dh) view of one fused projection."""
    q, k, v = (unit.split_heads(t) for t in unit.qkv(x).chunk(3, dim=-1))
    return q * (1.0 / math.sqrt(unit.d // unit.heads)), k, v


def key_logits(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Attention logits laid out key-major: q (B, h, Lq, dh), k (B, h, Lk, dh) -> (B, h, Lk, Lq),
    padded keys (`key_mask` (B, Lk) False) at -inf.

    Key-major because the softmax reductions then run over dim -2 and vectorise along the
    queries (a max over a last dim of ~20 runs 4-5x slower on CPU); the -inf bias enters as the
    product's accumulator (`baddbmm_` with beta 1) instead of a masked fill after it."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    qt = q.flatten(0, 1).transpose(1, 2)
    if key_mask is None:
        return torch.bmm(k.flatten(0, 1), qt).view(b, h, lk, lq)
    bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~key_mask, NEG)
    out = bias[:, None, :, None].expand(b, h, lk, lq).contiguous()
    return out.view(b * h, lk, lq).baddbmm_(k.flatten(0, 1), qt).view(b, h, lk, lq)


def max_over(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x.amax(dim), the same values, by halving: the maximum of two overlapping halves until one
    row is left. On CPU, amax over a dim of 16-36 with an inner size of ~20 runs 4-5x slower
    than these few elementwise passes (docs/benchmarks.md: Scoring engine); max is exact either way."""
    if x.shape[dim] == 1:
        return x.squeeze(dim).clone()  # a new tensor, as amax's: callers then modify x in place
    while x.shape[dim] > 1:
        n = x.shape[dim]
        half = (n + 1) // 2  # overlapping by one when n is odd: max is idempotent
        x = torch.maximum(x.narrow(dim, 0, half), x.narrow(dim, n - half, half))
    return x.squeeze(dim)


def own_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
    """Softmax statistics of rows attending to their own item's keys: q, k, v (B, h, L, dh),
    key_mask (B, L) or None -> m, l (B, h, L) float32 and o (B, h, L, dh) in v's dtype."""
    logits = key_logits(q, k, key_mask)  # (B, h, L keys, L queries)
    m = max_over(logits, -2)
    p = logits.sub_(m.unsqueeze(-2)).exp_()
    return m.float(), p.sum(dim=-2, dtype=torch.float32), p.transpose(-1, -2) @ v


@torch.no_grad()
def build_image_bank(model, regions: torch.Tensor, dtype: torch.dtype = torch.float32) -> ImageBank:
    """Regions (N, k, D_img) already on the model's device -> ImageBank (one chunk)."""
    r, i0 = model.encode_image(regions)
    return image_bank_from_encoded(model, r, i0, dtype)


@torch.no_grad()
def image_bank_from_encoded(model, r: torch.Tensor, i0: torch.Tensor,
                            dtype: torch.dtype = torch.float32) -> ImageBank:
    """ImageBank from already projected regions R (N, k, d) and i0 (N, d); the row tensors
    stored in `dtype`."""
    r, i0 = r.detach(), i0.detach()
    q, k, v = project_qkv(model.cross_unit, r)
    m, l, o = own_stats(q, k, v, None)
    cast = lambda t: t.to(dtype).contiguous()  # noqa: E731
    return ImageBank(cast(r), i0.float().contiguous(), cast(q), cast(k), cast(v),
                     m.contiguous(), l.contiguous(), cast(o))


def empty_image_bank(n: int, k: int, d: int, heads: int, dtype: torch.dtype, device) -> ImageBank:
    """An uninitialised bank of n images, to be filled chunk by chunk (no transient copy)."""
    rows = lambda: torch.empty(n, heads, k, d // heads, dtype=dtype, device=device)  # noqa: E731
    stat = lambda: torch.empty(n, heads, k, device=device)  # noqa: E731
    return ImageBank(torch.empty(n, k, d, dtype=dtype, device=device),
                     torch.empty(n, d, device=device), rows(), rows(), rows(), stat(), stat(), rows())


def fill_image_bank(bank: ImageBank, start: int, part: ImageBank) -> None:
    for f in IMAGE_FIELDS:
        getattr(bank, f)[start:start + len(part)] = getattr(part, f)


def pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, length: int):
    """(B, n, D), (B, n) -> padded or cut to `length` positions (cut positions must be padding)."""
    n = tokens.shape[1]
    if n < length:
        tokens = torch.nn.functional.pad(tokens, (0, 0, 0, length - n))
        mask = torch.nn.functional.pad(mask, (0, length - n), value=False)
    return tokens[:, :length], mask[:, :length]


@torch.no_grad()
def text_bucket_from_encoded(model, e: torch.Tensor, c0: torch.Tensor, mask: torch.Tensor,
                             captions: torch.Tensor, dtype: torch.dtype = torch.float32):
    """(TextBucket, c0) from already projected tokens E' (B, L, d) with mask (B, L); the
    bucket length is L and its row tensors are stored in `dtype`."""
    unit = model.cross_unit
    bucket = empty_text_bucket(captions, mask.shape[1], unit.d, unit.heads, dtype, e.device)
    fill_text_bucket(model, bucket, 0, e.detach(), mask)
    return bucket, c0.detach().float()


def empty_text_bucket(captions: torch.Tensor, length: int, d: int, heads: int, dtype: torch.dtype,
                      device) -> TextBucket:
    """An uninitialised bucket for the captions at bank positions `captions`, to be filled
    chunk by chunk (`fill_text_bucket`)."""
    n = len(captions)
    return TextBucket(length, captions, torch.empty(n, length, d, dtype=dtype, device=device),
                      torch.empty(n, length, dtype=torch.bool, device=device),
                      *(torch.empty(n, heads, length, d // heads, dtype=dtype, device=device)
                        for _ in range(3)))


def fill_text_bucket(model, bucket: TextBucket, start: int, e: torch.Tensor, mask: torch.Tensor) -> None:
    """Write rows start:start+B of a bucket from E' (B, L, d) and its mask: E' with padded
    rows zeroed, and its Q/K/V, cast to the bucket's dtype on the way in."""
    stop = start + len(e)
    e = e * mask.unsqueeze(-1).to(e.dtype)  # padded rows carry no value
    bucket.e[start:stop] = e
    bucket.mask[start:stop] = mask
    for dst, src in zip((bucket.q, bucket.k, bucket.v), project_qkv(model.cross_unit, e)):
        dst[start:stop] = src
