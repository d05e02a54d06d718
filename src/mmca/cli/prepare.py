"""`mmca prepare`: compute and cache the frozen image and text features of a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from mmca.cli.features import add_feature_arguments, feature_options, non_negative_int, positive_int
from mmca.errors import DataError

if TYPE_CHECKING:
    from mmca.features.prepare import PreparedSplit

NAME = "prepare"
HELP = "compute and cache the frozen features of a dataset (once; later runs reuse them)"
DESCRIPTION = """\
Prepare DATASET_DIR (either layout: an images folder with images/, captions.tsv and
splits/NAME.txt, or precomp files {split}_ims.npy + {split}_caps.txt) for training,
evaluation and search:

  images  an ImageNet CNN (frozen; --backbone: efficientnet_lite2, the default, or
          mobilenet_v2, ~2.5x faster) on the photo squashed to 352x352 (--image-size); its last
          11x11x1280 map is average-pooled to a GRID x GRID grid of regions (6 -> 36, 7 -> 49).
          `mmca train` with mirrored views (the `cpu` preset) also prepares the train
          split's photos flipped left to right.
          Precomp datasets ship their region features; these are used as they are.
  text    per-token states of a frozen BERT-family encoder (start and end tokens kept,
          at most --max-tokens tokens; --text-encoder: mpnet (all-mpnet-base-v2, the
          default), minilm (all-MiniLM-L6-v2, ~7x faster) or a model directory).

Features are stored as float16 .npy files in the cache directory (--cache, else
$MMCA_CACHE_DIR, else $XDG_CACHE_HOME/mmca, else ~/.cache/mmca), one folder per dataset,
one entry per split and side, each with a manifest.json of what it was built from. A
second run with the same settings and unchanged inputs reuses the cache in about a second;
a changed setting, image file, caption or model rebuilds only what it affects.
Nothing is ever written into DATASET_DIR. An interrupted run leaves nothing that a later
run would trust.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", type=Path, metavar="DATASET_DIR", help="the dataset folder (read only)")
    p.add_argument("--splits", nargs="+", metavar="SPLIT", help="splits to prepare (default: all splits found)")
    p.add_argument("--cache", type=Path, metavar="DIR", help="cache directory (default: see above)")
    add_feature_arguments(p)
    p.add_argument(
        "--captions-per-image",
        type=non_negative_int,
        default=5,
        metavar="N",
        help="captions each image must have (default: 5; 0 accepts any count that is the same for every image)",
    )
    p.add_argument("--force", action="store_true", help="rebuild the features even when the cache is valid")
    p.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="processes computing features, one torch thread each (default: one per CPU for large splits)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")


def run(args: argparse.Namespace) -> int:
    from mmca.data.layouts import list_splits
    from mmca.features.prepare import prepare_split

    splits = args.splits or list_splits(args.dataset)
    if not splits:
        raise DataError(f"{args.dataset} has no splits",
                        "add splits/NAME.txt (images folder) or NAME_caps.txt (precomp)")
    rows: list[dict[str, str]] = []
    folders: dict[Path, None] = {}
    described: dict[str, None] = {}
    features = feature_options(args)
    for split in splits:
        prepared = prepare_split(
            args.dataset,
            split,
            features,
            cache_dir=args.cache,
            captions_per_image=args.captions_per_image or None,
            progress=not args.no_progress,
            force=args.force,
            workers=args.workers,
        )
        rows.append(_row(prepared))
        described[prepared.dataset.spec.describe()] = None
        folders.update(dict.fromkeys(e.path.parent for e in prepared.entries))
    print(_table(rows))
    for line in described:
        print(f"features: {line}")
    print(f"extraction precision: {features.precision.reason}")
    for folder in folders:
        print(f"cache: {folder}")
    return 0


def _row(prepared: PreparedSplit) -> dict[str, str]:
    data = prepared.dataset
    lengths = data.token_features.lengths
    built = [e.kind for e in prepared.entries if not e.reused]
    truncated = next(e.manifest["counts"]["truncated"] for e in prepared.entries if e.kind == "text")
    return {
        "split": data.split,
        "images": f"{data.num_images:,}",
        "captions": f"{data.num_captions:,}",
        "regions x dim": f"{data.image_features.shape[1]} x {data.image_features.shape[2]}",
        "tokens mean/max x dim": f"{lengths.mean():.1f}/{lengths.max()} x {data.token_features.dim}",
        "truncated": f"{truncated:,}",
        "cache": "reused" if not built else "built " + "+".join(built),
        "time": f"{prepared.seconds:.1f}s",
    }


def _table(rows: list[dict[str, str]]) -> str:
    heads = list(rows[0])
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in heads}
    lines = ["  ".join(h.ljust(widths[h]) for h in heads)]
    lines += ["  ".join(r[h].ljust(widths[h]) for h in heads) for r in rows]
    return "\n".join(lines)
