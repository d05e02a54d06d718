"""Per-item precomputation: everything of the cross unit that depends on one image or one
caption only, computed once per item instead of once per pair.

For an image: R (the FC-projected regions, the residual of the cross unit), i0, the cross
unit's Q/K/V of R, and the softmax statistics of the region-region attention block (row
max, sum of exp, exp-weighted V). For a caption: the same for E' and the token-token block,
plus c0. A pair then only needs its two cross blocks (Q_r·K_eᵀ and Q_e·K_rᵀ), merged with the
per-item statistics by the log-sum-exp rule (`mmca.engine.pairs`).

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


@dataclass
class ImageBank:
    """Per-image parts, all (N, ...) on one device. Q is pre-scaled by 1/sqrt(d/h)."""

    r: torch.Tensor  # (N, k, d) residual input of the cross unit
    i0: torch.Tensor  # (N, d) float32, unit
    q: torch.Tensor  # (N, h, k, dh)
    k: torch.Tensor  # (N, h, k, dh)
    v: torch.Tensor  # (N, h, k, dh)
    m: torch.Tensor  # (N, h, k) row max of the region-region logits
    l: torch.Tensor  # (N, h, k) sum of exp(logit - m)
    o: torch.Tensor  # (N, h, k, dh) exp-weighted V, unnormalised

    def __len__(self) -> int:
        return self.r.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.r, self.i0, self.q, self.k, self.v, self.m, self.l, self.o))


@dataclass
class TextBucket:
    """Captions padded to one common length `length`."""

    length: int
    captions: torch.Tensor  # (Mb,) int64, global caption index of each row
    e: torch.Tensor  # (Mb, L, d) E'; zero on padded rows
    mask: torch.Tensor  # (Mb, L) bool, True on real tokens
    q: torch.Tensor  # (Mb, h, L, dh), pre-scaled
    k: torch.Tensor
    v: torch.Tensor
    m: torch.Tensor  # (Mb, h, L)
    l: torch.Tensor
    o: torch.Tensor  # (Mb, h, L, dh)
    key_bias: torch.Tensor  # (Mb, 1, 1, L) 0 on real tokens, -inf on padding

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.captions, self.e, self.mask, self.q, self.k, self.v, self.m, self.l,
                    self.o, self.key_bias))


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
        return self.c0.numel() * 4 + sum(b.nbytes for b in self.buckets)


def bucket_length(n: int, granule: int) -> int:
    """The padded length of a caption of n tokens: n rounded up to a multiple of `granule`."""
    return int(math.ceil(n / granule) * granule)


def _self_stats(unit, x: torch.Tensor, key_mask: torch.Tensor | None):
    """Q (pre-scaled), K, V of x (B, L, d) and the softmax statistics of x attending to itself.
    -> q, k, v (B, h, L, dh), m, l (B, h, L), o (B, h, L, dh)."""
    q, k, v = (unit.split_heads(t) for t in unit.qkv(x).chunk(3, dim=-1))
    q = q * (1.0 / math.sqrt(unit.d // unit.heads))
    logits = q @ k.transpose(-1, -2)  # (B, h, L, L)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], NEG)
    m = logits.amax(dim=-1)
    p = torch.exp(logits - m.unsqueeze(-1))
    return q.contiguous(), k.contiguous(), v.contiguous(), m, p.sum(dim=-1), p @ v


@torch.no_grad()
def build_image_bank(model, regions: torch.Tensor, dtype: torch.dtype = torch.float32) -> ImageBank:
    """Regions (N, k, D_img) already on the model's device -> ImageBank (one chunk)."""
    r, i0 = model.encode_image(regions)
    return image_bank_from_encoded(model, r, i0, dtype)


@torch.no_grad()
def image_bank_from_encoded(model, r: torch.Tensor, i0: torch.Tensor,
                            dtype: torch.dtype = torch.float32) -> ImageBank:
    """ImageBank from already projected regions R (N, k, d) and i0 (N, d)."""
    r, i0 = r.detach(), i0.detach()
    q, k, v, m, l, o = _self_stats(model.cross_unit, r, None)
    cast = lambda t: t.to(dtype).contiguous()  # noqa: E731
    return ImageBank(cast(r), i0.float().contiguous(), cast(q), cast(k), cast(v),
                     m.float().contiguous(), l.float().contiguous(), cast(o))


def concat_image_banks(parts: list[ImageBank]) -> ImageBank:
    if len(parts) == 1:
        return parts[0]
    return ImageBank(*(torch.cat([getattr(p, f) for p in parts]) for f in
                       ("r", "i0", "q", "k", "v", "m", "l", "o")))


@torch.no_grad()
def build_text_bucket(model, tokens: torch.Tensor, mask: torch.Tensor, captions: torch.Tensor,
                      length: int, dtype: torch.dtype = torch.float32):
    """Tokens (B, n, D_txt) with mask (B, n), n <= length -> (TextBucket padded to `length`, c0)."""
    b, n, _ = tokens.shape
    if n < length:
        tokens = torch.nn.functional.pad(tokens, (0, 0, 0, length - n))
        mask = torch.nn.functional.pad(mask, (0, length - n), value=False)
    tokens = tokens[:, :length]
    mask = mask[:, :length]
    e, c0 = model.encode_text(tokens, mask)
    return text_bucket_from_encoded(model, e, c0, mask, captions, dtype)


@torch.no_grad()
def text_bucket_from_encoded(model, e: torch.Tensor, c0: torch.Tensor, mask: torch.Tensor,
                             captions: torch.Tensor, dtype: torch.dtype = torch.float32):
    """(TextBucket, c0) from already projected tokens E' (B, L, d) with mask (B, L); the
    bucket length is L."""
    e, c0 = e.detach(), c0.detach()
    b, length = mask.shape
    e = e * mask.unsqueeze(-1).to(e.dtype)  # padded rows carry no value
    q, k, v, m, l, o = _self_stats(model.cross_unit, e, mask)
    key_bias = torch.zeros(b, 1, 1, length, dtype=dtype, device=e.device).masked_fill(
        ~mask[:, None, None, :], NEG)
    cast = lambda t: t.to(dtype).contiguous()  # noqa: E731
    bucket = TextBucket(length, captions, cast(e), mask.contiguous(), cast(q), cast(k), cast(v),
                        m.float().contiguous(), l.float().contiguous(), cast(o), key_bias)
    return bucket, c0.float()
