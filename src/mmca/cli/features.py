"""The feature flags shared by the commands that compute features (--backbone, --image-size,
--grid, --text-encoder, --max-tokens, --extract-precision) as a `FeatureRequest`, how a command
that has a checkpoint adopts the checkpoint's feature spec, and the argument types they share."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmca.data.spec import FeatureSpec
from mmca.features.backbone import BACKBONES, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from mmca.features.options import FeatureOptions, FeatureRequest, extraction_options
from mmca.features.precision import CHOICES, FP32
from mmca.features.text_encoder import DEFAULT_TEXT_ENCODER


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
    default = "the checkpoint's" if adopts else None
    own = FeatureOptions()
    size_default = default or "the backbone's own"
    names = ", ".join(f"{e.name} ({e.imagenet_top1}%% ImageNet top-1 at {e.native_size} px; fed {e.image_size} px)"
                      for e in BACKBONES.values())
    p.add_argument("--backbone", choices=sorted(BACKBONES), default=None, metavar="NAME",
                   help=f"image backbone: {names} (default: {default or own.backbone})")
    p.add_argument("--image-size", type=image_side, default=None, metavar="PX",
                   help=f"input side the photos are squashed to, in pixels (default: {size_default})")
    p.add_argument("--grid", type=int, default=None, choices=(6, 7),
                   help=f"image regions per side (default: {default or own.grid})")
    p.add_argument("--text-encoder", metavar="NAME|DIR",  # a str: "./minilm" must stay a path, not a name
                   help="a registered text encoder (mpnet: all-mpnet-base-v2, 768-d; minilm: all-MiniLM-L6-v2, "
                        "384-d, ~7x faster) or a local BERT-family model directory "
                        f"(transformers or sentence-transformers layout) (default: {default or DEFAULT_TEXT_ENCODER})")
    p.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                   help=f"token limit per caption, the start and end tokens included "
                        f"(default: {default or own.max_tokens})")
    p.add_argument("--extract-precision", choices=CHOICES, default=None,
                   help="what the frozen extractors compute in: bf16 (autocast), int8 (the text encoder's Linear "
                        "layers quantised; images stay fp32), or auto (bf16 where the CPU has bf16 units, int8 "
                        "text where fbgemm has VNNI, else fp32). Another precision makes another feature set "
                        f"(default: {default or FP32})")


def image_side(text: str) -> int:
    """An argparse type: an input side in pixels."""
    return _int_in(text, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)


def feature_request(args: argparse.Namespace) -> FeatureRequest:
    """The feature flags given (None: not given)."""
    return FeatureRequest(args.backbone, args.image_size, args.grid, args.text_encoder, args.max_tokens,
                          args.extract_precision)


def feature_options(args: argparse.Namespace, spec: FeatureSpec | None = None) -> FeatureOptions:
    """The options `open_dataset` computes features with: those of a checkpoint's feature spec
    when there is one (flags given must agree with it), else the flags or their defaults."""
    request = feature_request(args)
    return request.options() if spec is None else extraction_options(spec, request)


def checkpoint_feature_spec(path: Path) -> FeatureSpec:
    from mmca.checkpoint import checkpoint_spec, read_checkpoint

    return checkpoint_spec(read_checkpoint(path), path)
