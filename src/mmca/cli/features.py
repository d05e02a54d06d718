"""The feature flags shared by the commands that compute features (--backbone, --image-size,
--grid, --text-encoder, --max-tokens, --extract-precision), how a command that has a checkpoint adopts the checkpoint's feature spec, and
the argument types they share."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mmca.data.spec import FeatureSpec
from mmca.features.options import extraction_options

DEFAULT_GRID = 6
DEFAULT_MAX_TOKENS = 64
DEFAULT_EXTRACT_PRECISION = "fp32"  # every feature set measured in docs/results.md was made in fp32


def _int_in(text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"must be {'at least ' + str(low) if high is None else f'{low}..{high}'}, "
                                         f"got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _int_in(text, 1)


def non_negative_int(text: str) -> int:
    return _int_in(text, 0)


def port_number(text: str) -> int:
    return _int_in(text, 1, 65535)


def add_feature_arguments(p: argparse.ArgumentParser, adopts: bool = False) -> None:
    """`adopts`: the command has a checkpoint whose feature spec is the default."""
    from mmca.features.backbone import BACKBONES, DEFAULT_BACKBONE

    default = "the checkpoint's" if adopts else None
    size_default = default or "the backbone's own"
    names = ", ".join(f"{e.name} ({e.imagenet_top1}%% ImageNet top-1 at {e.native_size} px; fed {e.image_size} px)"
                      for e in BACKBONES.values())
    p.add_argument("--backbone", choices=sorted(BACKBONES), default=None, metavar="NAME",
                   help=f"image backbone: {names} (default: {default or DEFAULT_BACKBONE})")
    p.add_argument("--image-size", type=image_side, default=None, metavar="PX",
                   help=f"input side the photos are squashed to, in pixels (default: {size_default})")
    p.add_argument("--grid", type=int, default=None, choices=(6, 7),
                   help=f"image regions per side (default: {default or DEFAULT_GRID})")
    p.add_argument("--text-encoder", metavar="NAME|DIR",  # a str: "./minilm" must stay a path, not a name
                   help="a registered text encoder (minilm: all-MiniLM-L6-v2, 384-d; mpnet: all-mpnet-base-v2, "
                        "768-d, from its optional wheels) or a local BERT-family model directory "
                        f"(transformers or sentence-transformers layout) (default: {default or 'minilm'})")
    p.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                   help=f"token limit per caption, [CLS] and [SEP] included (default: {default or DEFAULT_MAX_TOKENS})")
    p.add_argument("--extract-precision", choices=("auto", "fp32", "bf16", "int8"), default=None,
                   help="what the frozen extractors compute in: bf16 (autocast), int8 (the text encoder's Linear "
                        "layers quantised; images stay fp32), or auto (bf16 where the CPU has bf16 units, int8 "
                        "text where fbgemm has VNNI, else fp32). Another precision makes another feature set "
                        f"(default: {default or DEFAULT_EXTRACT_PRECISION})")


def image_side(text: str) -> int:
    """An argparse type: an input side in pixels."""
    from mmca.features.backbone import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

    return _int_in(text, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)


def feature_options(args: argparse.Namespace, spec: FeatureSpec | None = None) -> dict[str, Any]:
    """backbone / image_size / grid / text_encoder / max_tokens for `open_dataset`: those of a
    checkpoint's feature spec when there is one (explicit flags must agree with it), else the
    flags or their defaults."""
    from mmca.features.backbone import DEFAULT_BACKBONE
    from mmca.features.precision import resolve_extract_precision

    if spec is None:
        return {"backbone": args.backbone or DEFAULT_BACKBONE, "image_size": args.image_size,
                "grid": DEFAULT_GRID if args.grid is None else args.grid, "text_encoder": args.text_encoder,
                "max_tokens": DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens,
                "precision": resolve_extract_precision(args.extract_precision or DEFAULT_EXTRACT_PRECISION)}
    return extraction_options(spec, args.grid, args.text_encoder, args.max_tokens, args.backbone, args.image_size,
                              args.extract_precision)


def checkpoint_feature_spec(path: Path) -> FeatureSpec:
    from mmca.checkpoint import checkpoint_spec, read_checkpoint

    return checkpoint_spec(read_checkpoint(path), path)
