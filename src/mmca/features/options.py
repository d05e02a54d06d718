"""Feature options from a feature spec: what `prepare_split` / `open_dataset` need to recompute
a model's features, and the extractors they name, checked against the spec before any feature
is computed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmca.data.spec import ARRAYS, PRECOMP, FeatureSpec, image_spec, text_spec
from mmca.errors import CheckpointError
from mmca.features.backbone import BACKBONES, DEFAULT_BACKBONE, ImageBackbone
from mmca.features.precision import ExtractPrecision, resolve_extract_precision
from mmca.features.text_encoder import TEXT_ENCODERS, TextEncoder


def extraction_options(spec: FeatureSpec, grid: int | None = None, text_encoder: str | Path | None = None,
                       max_tokens: int | None = None, backbone: str | None = None,
                       image_size: int | None = None, precision: str | None = None) -> dict[str, Any]:
    """`prepare_split` / `open_dataset` options that recompute `spec`'s features; an explicit
    option must agree with the spec (a flag that contradicts it is refused, not obeyed).
    `precision`: an --extract-precision choice, resolved here and compared with the spec's."""
    im = spec.image
    photos = im.source not in (PRECOMP, ARRAYS)
    recorded = ExtractPrecision(im.precision if photos else "fp32", spec.text.precision, "the model's")
    clashes = []
    if precision is not None:
        asked = resolve_extract_precision(precision)
        if (asked.text, asked.image if photos else "fp32") != (recorded.text, recorded.image):
            clashes.append(f"--extract-precision {precision} (images {asked.image}, text {asked.text}; "
                           f"the model's features: images {recorded.image}, text {recorded.text})")
    if backbone is not None and photos and backbone != im.source:
        clashes.append(f"--backbone {backbone} (the model was trained on {im.source} features)")
    if image_size is not None and im.image_size is not None and image_size != im.image_size:
        clashes.append(f"--image-size {image_size} (trained at {im.image_size} px)")
    if grid is not None and im.grid is not None and grid != im.grid:
        clashes.append(f"--grid {grid} (the model was trained on grid {im.grid})")
    if max_tokens is not None and spec.text.max_tokens is not None and max_tokens != spec.text.max_tokens:
        clashes.append(f"--max-tokens {max_tokens} (trained with {spec.text.max_tokens})")
    if clashes:
        raise CheckpointError("options contradict the model's feature spec: " + "; ".join(clashes),
                              "leave these flags out: mmca adopts the features the model was trained with")
    encoder_dir = text_encoder
    found_in = Path(spec.text.model_dir) if spec.text.model_dir else None
    if encoder_dir is None and found_in is not None and found_in.is_absolute() and found_in.is_dir():
        encoder_dir = spec.text.model_dir
    elif encoder_dir is None and spec.text.name in TEXT_ENCODERS:
        encoder_dir = spec.text.name  # found by name; else the default, both checked against the spec below
    opts = {"backbone": im.source if photos else (backbone or DEFAULT_BACKBONE),
            "image_size": im.image_size if im.image_size is not None else image_size,
            "grid": im.grid if im.grid is not None else (grid or 6), "text_encoder": encoder_dir,
            "max_tokens": spec.text.max_tokens if spec.text.max_tokens is not None else (max_tokens or 64),
            "precision": recorded}
    _precheck(spec, opts)
    return opts


def _precheck(spec: FeatureSpec, opts: dict[str, Any]) -> None:
    """Refuse extractors that would compute other features than `spec`'s before any feature is
    computed (reading a model's config and hashing the backbone weights take milliseconds)."""
    if spec.text.model_type != ARRAYS:
        found = FeatureSpec(spec.image, text_spec(text_encoder(opts)))
        where = opts["text_encoder"] or "the default (minilm, all-MiniLM-L6-v2)"
        spec.require_match(found, "the model", f"the text encoder {where}",
                           f"pass --text-encoder (Python: text_encoder=) with the encoder the model was trained with"
                           f" ({spec.text.name or spec.text.model_dir or spec.text.model_type})")
    if spec.image.source not in (PRECOMP, ARRAYS):
        if spec.image.source not in BACKBONES:
            raise CheckpointError(f"the model was trained on {spec.image.source} features, a backbone this mmca "
                                  f"does not know (it knows {', '.join(sorted(BACKBONES))})",
                                  "install the mmca version the model was trained with, or retrain")
        found = FeatureSpec(image_spec(image_backbone(opts)), spec.text)
        spec.require_match(found, "the model", "the installed image backbone",
                           "install the mmca version and weights the model was trained with, or retrain")


def image_backbone(opts: dict[str, Any]) -> ImageBackbone:
    """The `ImageBackbone` of `extraction_options`-style options."""
    return ImageBackbone(opts["grid"], opts["backbone"], opts["image_size"], precision=_precision(opts).image)


def text_encoder(opts: dict[str, Any]) -> TextEncoder:
    """The `TextEncoder` of `extraction_options`-style options."""
    return TextEncoder(opts["text_encoder"], opts["max_tokens"], _precision(opts).text)


def _precision(opts: dict[str, Any]) -> ExtractPrecision:
    return opts.get("precision") or ExtractPrecision()
