"""The evaluation job: the field's protocols (docs/data.md) over the engine's ranks, a results JSON
and a readable table.

A protocol with folds (MS-COCO 1K) ranks each run of consecutive images against their own
captions only, and averages the metrics over the folds.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmca.atomic import atomic_write_text
from mmca.data.dataset import RetrievalDataset
from mmca.data.spec import FeatureSpec
from mmca.dist import Shard
from mmca.engine import ScoringEngine
from mmca.engine.precision import resolve_precision
from mmca.errors import CheckpointError, DataError
from mmca.metrics import TIES, Metrics, average_folds, retrieval_metrics
from mmca.model import MMCA
from mmca.version import __version__

MODES = ("exact", "exhaustive", "shortlist")
DEFAULT_MAX_RANK = 10  # ranks exact below this: R@1/5/10 and a median below 10 are exact


@dataclass(frozen=True)
class Protocol:
    """Which images are ranked against which captions, and what the split must hold."""

    name: str
    description: str
    images: int | None = None  # required images in the split; None = any
    fold_size: int | None = None  # images per fold, metrics averaged over folds; None = one fold
    captions_per_image: int | None = None  # required per image; None = the dataset's own count


PROTOCOLS = {
    p.name: p
    for p in (
        Protocol("full", "the whole split, whatever its size"),
        Protocol("1k", "Flickr30K / Flickr8k 1K test: all 1,000 images and their 5,000 captions",
                 images=1000, captions_per_image=5),
        Protocol("coco1k", "MS-COCO 1K: the mean over 5 folds of 1,000 consecutive images and their "
                 "5,000 captions", images=5000, fold_size=1000, captions_per_image=5),
        Protocol("coco5k", "MS-COCO 5K: all 5,000 test images and their 25,000 captions",
                 images=5000, captions_per_image=5),
    )
}

# The paper's Table 1 and 2 (R@K only; it reports no median or mean rank), for context rows.
PAPER_RESULTS: dict[str, Metrics] = {
    name: {**dict(zip(("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"), row)),
           "rsum": round(sum(row), 1)}
    for name, row in {
        "Flickr30K 1K": (74.2, 92.8, 96.4, 54.8, 81.4, 87.8),
        "MS-COCO 1K": (74.8, 95.6, 97.7, 61.6, 89.8, 95.2),
        "MS-COCO 5K": (54.0, 82.5, 90.7, 38.7, 69.7, 80.8),
    }.items()
}


@dataclass
class EvaluationResult:
    """What `evaluate` measured; `to_dict` is the body of the results JSON."""

    metrics: Metrics  # averaged over folds when the protocol has folds
    protocol: str
    mode: str
    dataset: str
    split: str
    images: int
    captions: int
    pair_passes: int  # cross-unit passes actually run
    exhaustive_pairs: int  # what scoring every (image, caption) pair of every fold would take
    seconds: float  # wall time, encoding included
    encode_seconds: float  # of which building the image and text banks
    exact_below: int | None  # ranks below this are exact, the rest lower bounds; None: all exact
    shortlist_k: int | None  # candidates re-ranked per query, in shortlist mode
    precision: str  # the pair kernel's: "fp32" or "bf16"
    precision_reason: str
    ties: str  # "pessimistic" or "argsort" (mmca.metrics)
    device: str
    folds: list[Metrics] = field(default_factory=list)  # per fold, when there are several

    @property
    def pair_fraction(self) -> float:
        return self.pair_passes / self.exhaustive_pairs

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pair_fraction": self.pair_fraction}


def check_protocol(protocol: Protocol, caption_image: np.ndarray, num_images: int,
                   captions_per_image: int, where: str) -> None:
    """Raise a DataError if the split (`where`), whose images should each have
    `captions_per_image` captions, cannot be evaluated with `protocol`."""
    if protocol.images is not None and num_images != protocol.images:
        raise DataError(
            f"{where} has {num_images:,} images, but protocol {protocol.name!r} ({protocol.description}) "
            f"needs a split of exactly {protocol.images:,}",
            hint="use --protocol full to evaluate the whole split as it is")
    counts = np.bincount(np.asarray(caption_image, dtype=np.int64), minlength=num_images)
    if len(counts) > num_images:
        raise DataError(f"{where}: a caption points at image {len(counts) - 1}, but there are {num_images} images")
    if protocol.captions_per_image not in (None, captions_per_image):
        raise DataError(
            f"{where} has {captions_per_image} captions per image, but protocol {protocol.name!r} "
            f"needs {protocol.captions_per_image}", hint="use --protocol full to evaluate the split as it is")
    if (counts != captions_per_image).any():
        bad = int(np.argmax(counts != captions_per_image))
        raise DataError(
            f"{where}: {len(caption_image)} captions for {num_images} images, not {captions_per_image} "
            f"per image (image {bad} has {counts[bad]})",
            hint="every image needs the same number of captions")
    if protocol.fold_size is not None and num_images % protocol.fold_size:
        raise DataError(f"{where}: {num_images} images do not split into folds of {protocol.fold_size}")


def _check_dims(model: MMCA, dataset: RetrievalDataset, where: str) -> None:
    """The checkpoint must have been trained on features of this dataset's dimensions."""
    found = {"D_img": dataset.image_features.shape[2], "D_txt": dataset.token_features.dim}
    expected = {"D_img": model.config.img_dim, "D_txt": model.config.txt_dim}
    if found != expected:
        raise CheckpointError(
            f"the model expects features of {expected}, {where} has {found}",
            hint="evaluate with the image backbone and text encoder the checkpoint was trained with")


def fold_indices(caption_image: np.ndarray, num_images: int, fold_size: int | None
                 ) -> list[tuple[slice, np.ndarray]]:
    """(images, caption indices) of each fold: a run of consecutive images and all their captions."""
    caption_image = np.asarray(caption_image, dtype=np.int64)
    size = fold_size or num_images
    return [(slice(start, start + size),
             np.flatnonzero((caption_image >= start) & (caption_image < start + size)))
            for start in range(0, num_images, size)]


def evaluate(
    model: MMCA,
    dataset: RetrievalDataset,
    protocol: str | Protocol = "full",
    mode: str = "exact",
    device: str | torch.device | None = None,
    precision: str = "auto",
    max_rank: int | None = DEFAULT_MAX_RANK,
    shortlist_k: int = 100,
    ties: str = "pessimistic",
    feature_spec: FeatureSpec | None = None,
    shard: Shard | None = None,
    fused: str | None = None,
) -> EvaluationResult:
    """Rank every fold of `dataset` under `protocol` and compute its metrics (docs/data.md).

    mode: "exact" (pruned, same ranks as exhaustive), "exhaustive" (every pair through the
    cross unit) or "shortlist" (cross unit on the top `shortlist_k` of i0·c0 only; approximate).
    precision: "auto" is fp32 in the exact modes and bf16 in shortlist mode where the device
    has bf16 units (`mmca.engine.precision`); an explicit "bf16" is obeyed in any mode.
    max_rank: ranks are exact below it (None: all ranks exact, which mean rank needs).
    ties: how a candidate scoring exactly as the true item counts (`mmca.metrics`).
    feature_spec: the spec the model was trained with (from its checkpoint): the dataset's
    features must match it.
    shard: this rank's share of the queries under torch.distributed (`mmca.dist`); every rank
    returns the single-process metrics, bit for bit.
    fused: the fused pair kernel's switch (`mmca.engine.fused`; default $MMCA_FUSED_KERNEL).
    """
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        protocol = PROTOCOLS[protocol]
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if ties not in TIES:
        raise ValueError(f"unknown ties {ties!r}; choose one of {', '.join(TIES)}")
    if max_rank is not None and max_rank < 10:
        raise ValueError(f"max_rank={max_rank}: R@10 needs ranks exact below 10 at least (or None: all)")
    where = f"{dataset.name}/{dataset.split}"
    check_protocol(protocol, dataset.caption_image, dataset.num_images, dataset.captions_per_image, where)
    _check_dims(model, dataset, where)
    if feature_spec is not None:
        feature_spec.require_match(dataset.spec, "the checkpoint", f"{where}")

    device = torch.device(device) if device is not None else next(model.parameters()).device
    choice = resolve_precision(precision, device, exact=mode != "shortlist")
    engine = ScoringEngine(model, device=device, precision=choice.precision, fused=fused)
    folds, passes, pairs, encode_s, rank_s = [], 0, 0, 0.0, 0.0
    # Folds are disjoint, so encoding each fold's banks encodes every item exactly once.
    for images, captions in fold_indices(dataset.caption_image, dataset.num_images, protocol.fold_size):
        start = time.perf_counter()
        image_bank = engine.image_bank(dataset.image_features[images])
        text_bank = engine.text_bank(dataset.token_features, index=captions)
        encoded = time.perf_counter()
        ranked = engine.ranks(image_bank, text_bank, dataset.caption_image[captions] - images.start,
                              mode=mode, max_rank=max_rank, shortlist_k=shortlist_k, ties=ties, shard=shard)
        encode_s += encoded - start
        rank_s += time.perf_counter() - encoded
        folds.append(retrieval_metrics(ranked.i2t, ranked.t2i, exact_below=ranked.exact_below))
        passes += int(ranked.pair_passes)
        pairs += (images.stop - images.start) * len(captions)

    return EvaluationResult(
        metrics=average_folds(folds),
        protocol=protocol.name,
        mode=mode,
        dataset=dataset.name,
        split=dataset.split,
        images=dataset.num_images,
        captions=dataset.num_captions,
        pair_passes=passes,
        exhaustive_pairs=pairs,
        seconds=encode_s + rank_s,
        encode_seconds=encode_s,
        exact_below=ranked.exact_below,
        shortlist_k=shortlist_k if mode == "shortlist" else None,
        precision=choice.precision,
        precision_reason=choice.reason,
        ties=ties,
        device=str(device),
        folds=folds if len(folds) > 1 else [],
    )


def results_name(split: str, result: EvaluationResult) -> str:
    """eval-<split>-<protocol>-<mode>-<precision>[-<ties>][-full].json: runs that differ in what
    they measured never overwrite each other."""
    parts = [split, result.protocol, result.mode, result.precision]
    if result.ties != "pessimistic":
        parts.append(result.ties + "-ties")
    if result.exact_below is None and result.mode != "shortlist":
        parts.append("full")
    if result.mode == "shortlist":
        parts.append(f"k{result.shortlist_k}")
    return "eval-" + "-".join(parts) + ".json"


def default_results_path(checkpoint: str | Path, split: str, result: EvaluationResult) -> Path:
    """Where `mmca evaluate` writes without --out: inside a model directory, or beside a
    checkpoint file in its run folder, so that models side by side never share a results file."""
    checkpoint = Path(checkpoint)
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return folder / results_name(split, result)


def require_results_file(path: str | Path) -> Path:
    """`--out` names the JSON file to write: checked before any work, so that a folder, a path
    under a file, a link or a file mmca did not write is a clean error (and left as it is), not
    one after the whole evaluation has run. An earlier results file is replaced."""
    path = Path(path)
    if path.is_symlink():
        raise DataError(f"--out {path} is a symbolic link; it is left as it is", "pass the path of a new file")
    if path.is_dir():
        raise DataError(f"--out {path} is a folder; it takes the path of the JSON results file",
                        f"pass a file path, e.g. --out {path / 'eval.json'}")
    if path.exists() and not is_results_file(path):
        raise DataError(f"--out {path} is a file that is not an mmca evaluation result; it is left as it is",
                        "pass the path of a new file (or of an earlier `mmca evaluate` result to replace it)")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DataError(f"--out {path}: {parent} is a file, not a folder", "pass a path in a folder")
    return path


def is_results_file(path: Path) -> bool:
    """Whether `path` holds what `write_results` writes (a JSON object with the mmca version,
    the protocol and the metrics)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and {"mmca_version", "protocol", "metrics"} <= payload.keys()


def write_results(path: str | Path, result: EvaluationResult, **provenance: Any) -> Path:
    """Write the result, the mmca version and `provenance` (checkpoint, dataset root, ...) as
    JSON, atomically: a crash never leaves a truncated file."""
    payload = {"mmca_version": __version__, **provenance, **result.to_dict()}
    return atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def format_table(rows: dict[str, Metrics]) -> str:
    """Aligned plain text: per row name, one line per direction with R@1/5/10, medr, meanr,
    and rsum on the first. Missing or unknown values print as '-'; extra keys are ignored."""

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.1f}"

    header = ["", "direction", "R@1", "R@5", "R@10", "medr", "meanr", "rsum"]
    lines = [header]
    for name, m in rows.items():
        for d, label in (("i2t", "image->text"), ("t2i", "text->image")):
            values = [m.get(f"{d}_{key}") for key in ("r1", "r5", "r10", "medr", "meanr")]
            rsum = cell(m.get("rsum")) if d == "i2t" else ""
            lines.append([name if d == "i2t" else "", label, *map(cell, values), rsum])
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    return "\n".join(
        "  ".join(text.ljust(w) if c < 2 else text.rjust(w) for c, (text, w) in enumerate(zip(line, widths))).rstrip()
        for line in lines
    )
