"""Retrieval metrics of the field's protocol (docs/data.md, "The evaluation protocol"), from ranks.

Ranks are 0-based. By default (`ties="pessimistic"`) a tie counts against the true item, so
a collapsed model whose scores are all equal gets R@K = 0 rather than 100:

- text->image rank of caption j, whose image is g(j):
  #{images i != g(j) : S(i, j) >= S(g(j), j)}
- image->text rank of image i (best of its captions):
  min over its captions c of #{captions c' not of image i : S(i, c') >= S(i, c)}

`ties="argsort"` is the order of the field's code (VSE++, SCAN: `numpy.argsort(scores)[::-1]`,
read with a stable sort): among equal scores the higher index comes first, so a tied
candidate is ahead of the true item only if its index is higher. It matters on real data: the
MS-COCO 5K test set holds captions that are exact duplicates of another image's caption.

R@K = 100 * mean(rank < K); rsum is the sum of the six R@K. Median and mean rank are reported
1-based as the field computes them: floor(median(rank)) + 1 and mean(rank) + 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

RECALL_AT = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")
Metrics = dict[str, float | None]
TIES = ("pessimistic", "argsort")


def ahead(score, cand, thr, thr_idx, ties: str = "pessimistic"):
    """Whether a candidate (score, index) ranks ahead of the true item (thr, thr_idx); works
    on numpy arrays and torch tensors alike (broadcasting)."""
    if ties == "pessimistic":
        return score >= thr
    return (score > thr) | ((score == thr) & (cand > thr_idx))


def _as_numpy(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        return scores.detach().cpu().float().numpy()  # float() is exact for bf16/fp16
    return np.asarray(scores)


def ranks_from_scores(
    scores: np.ndarray | torch.Tensor, caption_image: np.ndarray | Sequence[int], ties: str = "pessimistic"
) -> tuple[np.ndarray, np.ndarray]:
    """The plain oracle of the rank convention: (i2t (N,), t2i (M,)) from S (N images, M captions)."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {', '.join(TIES)}, not {ties!r}")
    s = _as_numpy(scores)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or Inf: ranks would be meaningless")
    owner = np.asarray(caption_image, dtype=np.int64)
    n_images, n_captions = s.shape
    if owner.shape != (n_captions,):
        raise ValueError(f"caption_image has shape {owner.shape}, expected ({n_captions},)")
    own = owner[None, :] == np.arange(n_images)[:, None]  # own[i, j]: caption j describes image i
    if not own.any(axis=1).all():
        raise ValueError(f"image {int(np.argmin(own.any(axis=1)))} has no caption")

    images, captions = np.arange(n_images), np.arange(n_captions)
    # text->image: images other than the true one ranking ahead of the true one.
    true_t2i = s[owner, captions]
    t2i = (ahead(s, images[:, None], true_t2i[None, :], owner[None, :], ties) & ~own).sum(axis=0)

    # image->text: the count is non-increasing along the sort order, so the minimum over the
    # image's captions is reached at its caption that sorts first (best score; among equal
    # scores, under "argsort", the highest index).
    best_own = np.where(own, s, -np.inf).max(axis=1)
    best_idx = np.where(own & (s == best_own[:, None]), captions[None, :], -1).max(axis=1)
    i2t = (ahead(s, captions[None, :], best_own[:, None], best_idx[:, None], ties) & ~own).sum(axis=1)
    return i2t.astype(np.int64), t2i.astype(np.int64)


def _direction(ranks: np.ndarray, exact_below: int | None) -> dict[str, float | None]:
    """R@K, medr and meanr of one direction; None where the ranks do not determine the value."""
    ranks = np.asarray(ranks, dtype=np.int64)
    cap = np.inf if exact_below is None else exact_below
    out: dict[str, float | None] = {}
    exact = ranks < cap  # the others are lower bounds of the true rank
    for k in RECALL_AT:
        # rank < K is known when the rank is exact or its lower bound already reaches K.
        out[f"r{k}"] = float(100.0 * np.mean(ranks < k)) if (exact | (ranks >= k)).all() else None
    middle = np.partition(ranks, len(ranks) // 2)[len(ranks) // 2]  # upper middle of the sorted ranks
    out["medr"] = float(np.floor(np.median(ranks)) + 1) if middle < cap else None
    out["meanr"] = float(ranks.mean() + 1) if exact.all() else None
    return out


def retrieval_metrics(i2t: np.ndarray, t2i: np.ndarray, exact_below: int | None = None) -> Metrics:
    """i2t_r1/r5/r10, t2i_r1/r5/r10, rsum, i2t_medr/meanr, t2i_medr/meanr.

    `exact_below`: ranks below it are exact and ranks at or above it are lower bounds (the
    engine's early-stopping exact mode). Values those ranks cannot determine are None.
    """
    per = {"i2t": _direction(i2t, exact_below), "t2i": _direction(t2i, exact_below)}
    metrics: Metrics = {f"{d}_r{k}": per[d][f"r{k}"] for d in DIRECTIONS for k in RECALL_AT}
    recalls = list(metrics.values())
    metrics["rsum"] = None if None in recalls else float(sum(recalls))
    for d in DIRECTIONS:
        metrics[f"{d}_medr"] = per[d]["medr"]
        metrics[f"{d}_meanr"] = per[d]["meanr"]
    return metrics


def average_folds(folds: Sequence[Metrics]) -> Metrics:
    """Mean of each metric over folds (MS-COCO 1K); None if any fold lacks it."""
    if not folds:
        raise ValueError("no folds to average")
    out: Metrics = {}
    for key in folds[0]:
        values = [fold[key] for fold in folds]
        out[key] = None if None in values else float(np.mean(values))
    return out
