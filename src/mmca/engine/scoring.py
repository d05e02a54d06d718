"""The scoring engine: banks per item, pair scores in fixed-shape blocks, streamed."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

import mmca.engine.ranking as ranking
from mmca.dist import Shard
from mmca.engine.bank import (
    ImageBank,
    TextBank,
    bucketed_text_bank,
    build_image_bank,
    empty_image_bank,
    empty_text_bucket,
    fill_image_bank,
    fill_text_bucket,
    pad_tokens,
)
from mmca.engine.fused import FusedKernel
from mmca.engine.guards import require_finite, require_finite_weights
from mmca.engine.pairs import CrossWeights, score_block
from mmca.runtime import retain_freed_memory

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Pairs per block by device: fewer, larger calls (the kernel is ~40 tensor ops a block; 16-pair
# blocks ran at half the rate of 64 on one CPU thread). With fixed shapes every block is padded to
# exactly this size, so a small call pays up to one block per caption-length bucket.
DEFAULT_BLOCK_PAIRS = {"cpu": 64, "cuda": 256}
GRANULE = 16  # without fixed shapes, a block's tail is padded to a multiple of this
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _as_index(x, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.int64) if not torch.is_tensor(x) else x,
                           dtype=torch.int64).reshape(-1).to(device)


@contextmanager
def inference_mode(model):
    """Eval mode (no dropout) for the duration, then the model's own modes back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class ScoringEngine:
    """Scores image-caption pairs of a fixed MMCA model.

    `precision="fp32"` is exact (up to float rounding of a different but fixed summation
    order); `"bf16"` runs the pair kernel in bfloat16 (faster on CPUs with bf16 units and on
    GPUs, approximate: its effect is measured by `mmca bench`). The global part i0·c0 is
    always float32. `storage` is the dtype the banks keep their row tensors in: by default the
    compute dtype; `"bf16"` or `"fp16"` under fp32 compute is an explicit opt-in that halves the
    banks and moves scores by the rounding of the stored rows (ranks stay identical between
    the exact and exhaustive modes on the same banks; scores are no longer the fp32 model's).
    `block_pairs` bounds the pairs scored at once (memory ~ block_pairs x (k + L) x d floats;
    default by device, DEFAULT_BLOCK_PAIRS);
    with `fixed_shape` (the default) every block is padded to exactly `block_pairs` pairs, so a
    pair is always computed with the same shapes (kernels chosen by matrix size cannot change its
    float: the exact and exhaustive modes agree bit for bit); without it a block's tail is padded
    to a multiple of GRANULE only (training's mining pass, which compares within a tie tolerance
    and mostly makes small calls); `length_granule` sets the caption length buckets.
    `pair_budget` bounds the candidate pairs the exact rank passes hold at once (their masks,
    index vectors and candidate lists, ~50 bytes a pair; the capped mode's score cache too),
    whatever the gallery size. `check_weights` refuses a model with
    NaN/Inf weights (training's mining engine skips it: the trainer checks every gradient).
    `fused` is the fused pair kernel's switch ("off", "warm", "on"; default $MMCA_FUSED_KERNEL,
    else "warm": fused only for block shapes already compiled, `mmca.engine.fused`).
    """

    def __init__(self, model, device=None, precision: str = "fp32", block_pairs: int | None = None,
                 length_granule: int = 4, storage: str | None = None, pair_budget: int = 1 << 21,
                 check_weights: bool = True, fixed_shape: bool = True, fused: str | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
        if storage is not None and storage not in STORAGE:
            raise ValueError(f"storage must be one of {sorted(STORAGE)} or None, not {storage!r}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if self.device.type == "cpu":
            retain_freed_memory()  # blocks reallocate tens of MB: keep it mapped (mmca.runtime)
        self.model = model.to(self.device)
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.storage = precision if storage is None else storage
        self.storage_dtype = STORAGE[self.storage]
        if block_pairs is None:
            block_pairs = DEFAULT_BLOCK_PAIRS.get(self.device.type, 64)
        self.block_pairs = max(1, int(block_pairs))
        self.fixed_shape = fixed_shape
        self.length_granule = max(1, int(length_granule))
        self.pair_budget = max(1, int(pair_budget))
        if check_weights:
            require_finite_weights(self.model)
        self.weights = CrossWeights(self.model, self.dtype)
        self.fused = FusedKernel(fused)
        self.alpha = abs(float(model.alpha))  # ModelConfig refuses α < 0; the bound needs |α|
        # |S - i0·c0| <= alpha * |i1·c1| <= alpha (1 + tol), plus rounding of i0·c0 itself
        # (i1, c1 are normalised in float32 whatever the storage dtype)
        tol = 1e-5 if self.dtype == torch.float32 else 3e-2
        self.slack = self.alpha * (1 + tol) + 1e-5
        # How far a score may be from the float32 one: rounding in fp32; in bf16 the bound the
        # accuracy tests hold the engine to (3.3e-4 at most measured on the trained sample model,
        # ~30x below it at α 0.2: docs/benchmarks.md: Training step). Mining's tie tolerance is twice this.
        self.score_error = 5e-6 if self.dtype == torch.float32 else 0.05 * self.alpha + 1e-3
        self.pair_passes = 0

    # ---- banks -------------------------------------------------------------------------
    def image_bank(self, regions_or_dataset, batch_size: int = 64) -> ImageBank:
        """Regions (N, k, D_img) as a tensor/array, or a dataset with `image_batch`."""
        with inference_mode(self.model):
            return self._image_bank(regions_or_dataset, batch_size)

    def text_bank(self, token_features, index=None, batch_size: int = 256) -> TextBank:
        """A `TokenFeatures` (ragged), a dataset with `token_features`, or (tokens (M, n, D),
        mask (M, n)). `index` selects captions (default all)."""
        with inference_mode(self.model):
            return self._text_bank(token_features, index, batch_size)

    @torch.no_grad()
    def _image_bank(self, regions_or_dataset, batch_size: int) -> ImageBank:
        src = regions_or_dataset
        if hasattr(src, "image_batch"):
            n = src.num_images
            fetch = lambda s, e: src.image_batch(np.arange(s, e))  # noqa: E731
        else:
            n = len(src)
            # np.array copies the chunk: a read-only memmap must not back a tensor
            fetch = lambda s, e: torch.as_tensor(src[s:e] if torch.is_tensor(src)  # noqa: E731
                                                 else np.array(src[s:e], dtype=np.float32)).float()
        bank = None
        for s in range(0, n, batch_size):  # filled in place, chunk by chunk: no transient copy
            e = min(n, s + batch_size)
            regions = fetch(s, e).to(self.device)
            require_finite(regions, "image region features", "image", s)
            part = build_image_bank(self.model, regions, self.storage_dtype)
            require_finite(part.i0, "image embeddings i0", "image", s)
            if bank is None:
                _, k, d = part.r.shape
                bank = empty_image_bank(n, k, d, part.q.shape[1], self.storage_dtype, self.device)
            fill_image_bank(bank, s, part)
            del part
        if bank is None:  # empty gallery
            c = self.model.config
            bank = empty_image_bank(0, 0, c.d, c.heads, self.storage_dtype, self.device)
        return bank

    @torch.no_grad()
    def _text_bank(self, token_features, index, batch_size: int) -> TextBank:
        src = getattr(token_features, "token_features", token_features)
        if isinstance(src, tuple):
            tokens, mask = src
            tokens, mask = torch.as_tensor(tokens), torch.as_tensor(mask, dtype=torch.bool)
            all_lengths = mask.sum(1).cpu().numpy()

            def fetch(idx):
                idx = torch.as_tensor(idx)
                m = mask[idx]
                n = int(m.sum(1).max())
                return tokens[idx, :n].float(), m[:, :n]
        else:
            all_lengths = src.lengths
            fetch = lambda idx: src.batch(idx)  # noqa: E731
        index = np.arange(len(all_lengths)) if index is None else np.asarray(index, dtype=np.int64)
        lengths = np.asarray(all_lengths)[index]
        if len(index) and lengths.min() < 1:
            raise ValueError("every caption needs at least one token")
        c = self.model.config
        c0 = torch.empty(len(index), c.d, device=self.device)

        def make_bucket(length, members):  # filled in place, chunk by chunk
            bucket = empty_text_bucket(torch.as_tensor(members, device=self.device), length, c.d,
                                       c.heads, self.storage_dtype, self.device)
            for s in range(0, len(members), batch_size):
                pos = members[s:s + batch_size]
                tok, msk = fetch(index[pos])
                require_finite(tok, "caption token states", "caption of this bucket, row", s)
                tok, msk = pad_tokens(tok.to(self.device), msk.to(self.device), length)
                e, cc = self.model.encode_text(tok, msk)
                require_finite(cc, "caption embeddings c0", "caption of this bucket, row", s)
                fill_text_bucket(self.model, bucket, s, e, msk)
                c0[torch.as_tensor(pos, device=self.device)] = cc.float()
                del tok, msk, e, cc
            return bucket

        return bucketed_text_bank(c0, lengths, self.length_granule, make_bucket, {"index": index})

    # ---- scores ------------------------------------------------------------------------
    @torch.no_grad()
    def global_scores(self, images: ImageBank, texts: TextBank) -> torch.Tensor:
        """(N, M) i0·c0; for big galleries prefer per-block slices (`images.i0[a:b] @ texts.c0.T`)."""
        return images.i0 @ texts.c0.T

    def _score_bucket(self, images, texts, bucket_id, a, rows) -> torch.Tensor:
        """Score pairs (image a, bucket row) of one bucket in fixed-shape blocks -> (P,)."""
        bucket = texts.buckets[bucket_id]
        out = torch.empty(len(a), dtype=torch.float32, device=self.device)
        bp = self.block_pairs
        for s in range(0, len(a), bp):
            aa, rr = a[s:s + bp], rows[s:s + bp]
            p = len(aa)
            pad = bp - p if self.fixed_shape else (-p) % GRANULE
            if pad:  # repeat the last pair: every call has `block_pairs` rows (or a multiple of GRANULE)
                aa = torch.cat([aa, aa[-1:].expand(pad)])
                rr = torch.cat([rr, rr[-1:].expand(pad)])
            out[s:s + p] = score_block(self.weights, images, bucket, texts.c0, aa, rr, self.fused)[:p]
        self.pair_passes += len(a)
        require_finite(out, "pair scores")
        return out

    @torch.no_grad()
    def pair_scores(self, images: ImageBank, texts: TextBank, image_index, text_index) -> torch.Tensor:
        """Full S of the listed pairs -> (P,) float32 on the engine device."""
        a = _as_index(image_index, self.device)
        j = _as_index(text_index, self.device)
        if a.shape != j.shape:
            raise ValueError("image_index and text_index must have the same length")
        if not self.alpha:  # S = i0·c0, the same float the pair kernel would compute
            out = (images.i0[a] * texts.c0[j]).sum(dim=-1)
            require_finite(out, "pair scores")
            return out
        out = torch.empty(len(a), dtype=torch.float32, device=self.device)
        if not len(a):
            return out
        jn = j.cpu().numpy()
        bucket_of = texts.bucket_of[jn]
        row_of = torch.as_tensor(texts.row_of[jn], device=self.device)
        order = np.argsort(bucket_of, kind="stable")
        bounds = np.searchsorted(bucket_of[order], np.arange(len(texts.buckets) + 1))
        order_t = torch.as_tensor(order, device=self.device)
        for bid in range(len(texts.buckets)):
            lo, hi = bounds[bid], bounds[bid + 1]
            if lo == hi:
                continue
            sel = order_t[lo:hi]
            out[sel] = self._score_bucket(images, texts, bid, a[sel], row_of[sel])
        return out

    def iter_full_scores(self, images: ImageBank, texts: TextBank, image_block: int = 64,
                         known: tuple[torch.Tensor, torch.Tensor] | None = None,
                         images_span: tuple[int, int] | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Exhaustive S streamed by image block: yields (first, last, S[first:last] (nb, M)).
        `known` = (image of each caption, S of that pair): those pairs, already scored, are
        filled in rather than scored again (the same float: every block has one shape).
        `images_span`: only these image rows (default all)."""
        m = len(texts)
        first, n = images_span if images_span is not None else (0, len(images))
        for s in range(first, n, image_block):
            e = min(n, s + image_block)
            block = torch.empty(e - s, m, dtype=torch.float32, device=self.device)
            for bid, bucket in enumerate(texts.buckets):
                rows = torch.arange(len(bucket.captions), device=self.device)
                a = torch.arange(s, e, device=self.device).repeat_interleave(len(rows))
                r = rows.repeat(e - s)
                if known is None:
                    sc = self._score_bucket(images, texts, bid, a, r)
                else:
                    owner, score = known
                    cap = bucket.captions[r]
                    todo = owner[cap] != a
                    sc = score[cap].clone()
                    sc[todo] = self._score_bucket(images, texts, bid, a[todo], r[todo])
                block[:, bucket.captions] = sc.view(e - s, len(rows))
            yield s, e, block

    @torch.no_grad()
    def full_scores(self, images: ImageBank, texts: TextBank, image_block: int = 64) -> torch.Tensor:
        """Exhaustive (N, M) S, computed block by block."""
        out = torch.empty(len(images), len(texts), dtype=torch.float32, device=self.device)
        for s, e, block in self.iter_full_scores(images, texts, image_block):
            out[s:e] = block
        return out

    # ---- retrieval ---------------------------------------------------------------------
    def ranks(self, images: ImageBank, texts: TextBank, caption_image, mode: str = "exact",
              max_rank: int | None = None, shortlist_k: int = 100, image_block: int = 256,
              ties: str = "pessimistic", shard=None):
        """See `mmca.engine.ranking.ranks`; `shard` (a `mmca.dist.Shard`) splits the queries
        over the ranks of a process group."""
        return ranking.ranks(self, images, texts, caption_image, mode=mode, max_rank=max_rank,
                     shortlist_k=shortlist_k, image_block=image_block, ties=ties, shard=shard or Shard())

    def topk_images(self, images: ImageBank, texts: TextBank, k: int, mode: str = "exact"):
        """Per caption, the top-k images under full S -> (scores (M, k), indices (M, k));
        ties broken by the lower index. mode "exact" (pruned) or "exhaustive"."""
        return ranking.topk(self, images, texts, k, query="text", mode=mode)

    def topk_captions(self, images: ImageBank, texts: TextBank, k: int, mode: str = "exact"):
        """Per image, the top-k captions under full S -> (scores (N, k), indices (N, k))."""
        return ranking.topk(self, images, texts, k, query="image", mode=mode)


__all__ = ["PRECISIONS", "STORAGE", "ScoringEngine", "inference_mode"]
