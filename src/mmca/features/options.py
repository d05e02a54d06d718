"""Feature options: the one typed value that says how a split's frozen features are computed
(`FeatureOptions`), what a user asked for (`FeatureRequest`, None = not asked), and the
resolution of a request against a model's feature spec (`extraction_options`), checked before
any feature is computed."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from mmca.data.spec import ARRAYS, PRECOMP, FeatureSpec, image_spec, text_spec
from mmca.errors import CheckpointError
from mmca.features.backbone import BACKBONES, DEFAULT_BACKBONE, DEFAULT_GRID, ImageBackbone
from mmca.features.precision import ExtractPrecision, resolve_extract_precision
from mmca.features.text_encoder import DEFAULT_MAX_TOKENS, DEFAULT_TEXT_ENCODER, TEXT_ENCODERS, TextEncoder


@dataclass(frozen=True)
class FeatureOptions:
    """How the frozen features are computed: the image backbone by name, its input side (None:
    the backbone's own), the region grid, the text encoder (a name or a model directory; None:
    the default encoder), the token limit and the extractors' precision."""

    backbone: str = DEFAULT_BACKBONE
    image_size: int | None = None
    grid: int = DEFAULT_GRID
    text_encoder: str | Path | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    precision: ExtractPrecision = ExtractPrecision()

    def image_backbone(self) -> ImageBackbone:
        """The image extractor these options name."""
        return ImageBackbone(self.grid, self.backbone, self.image_size, precision=self.precision.image)

    def encoder(self) -> TextEncoder:
        """The text extractor these options name."""
        return TextEncoder(self.text_encoder, self.max_tokens, self.precision.text)


@dataclass(frozen=True)
class FeatureRequest:
    """The feature options a user asked for (flags or keywords); None: not asked, so a model's
    own feature spec, or else the `FeatureOptions` default. `precision` is an
    --extract-precision choice (auto, fp32, bf16, int8), resolved on this machine."""

    backbone: str | None = None
    image_size: int | None = None
    grid: int | None = None
    text_encoder: str | Path | None = None
    max_tokens: int | None = None
    precision: str | None = None

    def options(self) -> FeatureOptions:
        """The options asked for, the defaults where nothing was asked (no model to adopt from)."""
        asked = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if self.precision is not None:
            asked["precision"] = resolve_extract_precision(self.precision)
        return FeatureOptions(**asked)


def extraction_options(spec: FeatureSpec, request: FeatureRequest = FeatureRequest()) -> FeatureOptions:
    """The options that recompute `spec`'s features; an option the request names must agree with
    the spec (a flag that contradicts it is refused, not obeyed). The extractors they name are
    checked against the spec before any feature is computed."""
    im = spec.image
    photos = _from_photos(spec)
    recorded = ExtractPrecision(im.precision if photos else "fp32", spec.text.precision, "the model's")
    asked = request.options()
    clashes = _clashes(spec, request, asked.precision, recorded)
    if clashes:
        raise CheckpointError("options contradict the model's feature spec: " + "; ".join(clashes),
                              "leave these flags out: mmca adopts the features the model was trained with")
    options = FeatureOptions(
        backbone=im.source if photos else asked.backbone,
        image_size=im.image_size if im.image_size is not None else asked.image_size,
        grid=im.grid if im.grid is not None else asked.grid,
        text_encoder=_encoder_dir(spec, request.text_encoder),
        max_tokens=spec.text.max_tokens if spec.text.max_tokens is not None else asked.max_tokens,
        precision=recorded,
    )
    _precheck(spec, options)
    return options


def _clashes(spec: FeatureSpec, request: FeatureRequest, asked: ExtractPrecision,
             recorded: ExtractPrecision) -> list[str]:
    """What the request asks that differs from the spec, one phrase per flag."""
    im, clashes = spec.image, []
    photos = _from_photos(spec)
    computed = (asked.image if photos else "fp32", asked.text)
    if request.precision is not None and computed != (recorded.image, recorded.text):
        clashes.append(f"--extract-precision {request.precision} (images {asked.image}, text {asked.text}; "
                       f"the model's features: images {recorded.image}, text {recorded.text})")
    if request.backbone is not None and photos and request.backbone != im.source:
        clashes.append(f"--backbone {request.backbone} (the model was trained on {im.source} features)")
    if request.image_size is not None and im.image_size is not None and request.image_size != im.image_size:
        clashes.append(f"--image-size {request.image_size} (trained at {im.image_size} px)")
    if request.grid is not None and im.grid is not None and request.grid != im.grid:
        clashes.append(f"--grid {request.grid} (the model was trained on grid {im.grid})")
    if (request.max_tokens is not None and spec.text.max_tokens is not None
            and request.max_tokens != spec.text.max_tokens):
        clashes.append(f"--max-tokens {request.max_tokens} (trained with {spec.text.max_tokens})")
    return clashes


def _from_photos(spec: FeatureSpec) -> bool:
    """Whether the spec's image features come from photos through a backbone."""
    return spec.image.source not in (PRECOMP, ARRAYS)


def _encoder_dir(spec: FeatureSpec, asked: str | Path | None) -> str | Path | None:
    """The text encoder to load: the one asked for, else the spec's model directory where it
    still exists, else the spec's registered name, else the default (all checked by `_precheck`)."""
    if asked is not None:
        return asked
    found_in = Path(spec.text.model_dir) if spec.text.model_dir else None
    if found_in is not None and found_in.is_absolute() and found_in.is_dir():
        return spec.text.model_dir
    return spec.text.name if spec.text.name in TEXT_ENCODERS else None


def _precheck(spec: FeatureSpec, options: FeatureOptions) -> None:
    """Refuse extractors that would compute other features than `spec`'s before any feature is
    computed (reading a model's config and hashing the backbone weights take milliseconds)."""
    if spec.text.model_type != ARRAYS:
        found = FeatureSpec(spec.image, text_spec(options.encoder()))
        where = options.text_encoder or (f"the default ({DEFAULT_TEXT_ENCODER}, "
                                         f"{TEXT_ENCODERS[DEFAULT_TEXT_ENCODER].model})")
        spec.require_match(found, "the model", f"the text encoder {where}",
                           f"pass --text-encoder (Python: text_encoder=) with the encoder the model was trained with"
                           f" ({spec.text.name or spec.text.model_dir or spec.text.model_type})")
    if _from_photos(spec):
        if spec.image.source not in BACKBONES:
            raise CheckpointError(f"the model was trained on {spec.image.source} features, a backbone this mmca "
                                  f"does not know (it knows {', '.join(sorted(BACKBONES))})",
                                  "install the mmca version the model was trained with, or retrain")
        found = FeatureSpec(image_spec(options.image_backbone()), spec.text)
        spec.require_match(found, "the model", "the installed image backbone",
                           "install the mmca version and weights the model was trained with, or retrain")
