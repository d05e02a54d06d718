"""The feature spec: what a model's inputs were computed with, carried by every checkpoint and
index so that no job silently feeds a model features of another kind.

A model trained on 7x7 grids still runs on 6x6 ones (its image side mean-pools any number of
regions), and one trained on MiniLM token states runs on any 384-d states: nothing in the
weights says what they were trained on. The spec does. `evaluate`, `index`, `bench` and
`--init-from` adopt it and refuse data whose spec differs (`require_match`).

Two specs match when everything that decides the feature values agrees: for images the
backbone, its weights, input size and grid (or, for precomp features, the region count and
width); for text the encoder's type, config, weights and token limit. Where a file was found
(the encoder's directory, the precomp file) and whether training used mirrored views are
recorded as provenance, not compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from mmca.errors import CheckpointError

PRECOMP = "precomp"  # ImageSpec.source of region features shipped with the data
ARRAYS = "arrays"  # ImageSpec.source of in-memory arrays of unknown provenance (the Python API)


@dataclass(frozen=True)
class ImageSpec:
    source: str  # backbone name ("mobilenet_v2"), PRECOMP or ARRAYS
    regions: int  # k
    dim: int  # D_img
    grid: int | None = None  # backbone grid side (regions = grid²)
    image_size: int | None = None  # backbone input side in pixels
    weights_sha256: str | None = None
    features_file: str | None = None  # precomp: the file the training features came from (provenance)

    _PROVENANCE = ("features_file",)


@dataclass(frozen=True)
class TextSpec:
    model_type: str  # "bert", "mpnet", ... (or ARRAYS)
    dim: int  # D_txt
    max_tokens: int | None = None
    config_sha256: str | None = None
    weights: str | None = None  # weight file names and sizes (a copy or a move keeps them)
    model_dir: str | None = None  # where the encoder was found (provenance, a default for later jobs)
    name: str | None = None  # the registered name it was found by, if any (provenance)

    _PROVENANCE = ("model_dir", "name")


def _identity(part: ImageSpec | TextSpec) -> dict[str, Any]:
    return {f.name: getattr(part, f.name) for f in fields(part) if f.name not in part._PROVENANCE}


_INTS = ("regions", "dim", "grid", "image_size", "max_tokens")


def _part_from_dict(cls, raw: dict[str, Any]):
    known = {f.name for f in fields(cls)}
    values = {k: v for k, v in raw.items() if k in known}
    for k, v in values.items():
        bad_int = k in _INTS and v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1)
        if bad_int or (k not in _INTS and v is not None and not isinstance(v, str)):
            raise TypeError(f"{cls.__name__}.{k} = {v!r}")
    return cls(**values)


@dataclass(frozen=True)
class FeatureSpec:
    image: ImageSpec
    text: TextSpec
    mirror_images: bool = False  # training saw mirrored photos too (provenance)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_extractors(cls, backbone, encoder, mirror_images: bool = False) -> "FeatureSpec":
        """The spec of features computed by an `ImageBackbone` and a `TextEncoder`."""
        return cls(image_spec(backbone), text_spec(encoder), mirror_images)

    @classmethod
    def of_arrays(cls, regions: int, img_dim: int, txt_dim: int) -> "FeatureSpec":
        """In-memory features of unknown provenance: only the shapes can be checked."""
        return cls(ImageSpec(ARRAYS, int(regions), int(img_dim)), TextSpec(ARRAYS, int(txt_dim)))

    def with_mirror(self, mirror_images: bool) -> "FeatureSpec":
        return replace(self, mirror_images=bool(mirror_images))

    # ---- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"image": asdict(self.image), "text": asdict(self.text), "mirror_images": self.mirror_images}

    @classmethod
    def from_dict(cls, raw: Any) -> "FeatureSpec":
        try:
            return cls(_part_from_dict(ImageSpec, raw["image"]), _part_from_dict(TextSpec, raw["text"]),
                       bool(raw.get("mirror_images", False)))
        except (KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"malformed feature spec: {err!r}",
                                  "the file was not written by mmca, or was edited; use another one") from err

    # ---- comparison ---------------------------------------------------------------------
    def differences(self, other: "FeatureSpec") -> list[str]:
        """'image grid: 7 vs 6'-style lines for every identity field that differs. Shapes are
        compared always; names, hashes and sizes only where both sides know them (features
        of unknown provenance, ARRAYS, match anything of their shape)."""
        out = []
        for side, mine, theirs in (("image", self.image, other.image), ("text", self.text, other.text)):
            a, b = _identity(mine), _identity(theirs)
            unknown = ARRAYS in (a.get("source"), a.get("model_type"), b.get("source"), b.get("model_type"))
            for key in a:
                if a[key] != b[key] and not (unknown and key not in ("regions", "dim")):
                    out.append(f"{side} {key}: {_short(a[key])} vs {_short(b[key])}")
        return out

    def require_match(self, other: "FeatureSpec", mine: str, theirs: str, hint: str | None = None) -> None:
        """Raise a CheckpointError listing what differs between `mine` (self) and `theirs`."""
        diff = self.differences(other)
        if diff:
            raise CheckpointError(
                f"{theirs} was computed with other features than {mine}: " + "; ".join(diff)
                + f" ({mine} first)",
                hint or "use the features the model was trained with (mmca adopts them when no "
                        "--grid/--text-encoder/--max-tokens flag is given), or retrain on these")

    def require_source(self, precomp: bool, where: str) -> None:
        """Refuse data of the other kind (photos for a model of precomp features, or the
        reverse) before anything is computed."""
        if self.image.source == ARRAYS or precomp == (self.image.source == PRECOMP):
            return
        have = "precomputed region features" if precomp else "photos (the images-folder layout)"
        want = "precomputed (precomp) region features" if self.image.source == PRECOMP else \
            f"photos through {self.image.source}"
        raise CheckpointError(f"{where} holds {have}, but the model was trained on {want}",
                              "evaluate on data of the kind the model was trained on")

    def describe(self) -> str:
        """One line for people: 'mobilenet_v2 352 px, grid 6 (36 x 1280); bert minilm ≤64 tokens (384)'."""
        im, tx = self.image, self.text
        if im.grid is not None:
            left = f"{im.source} {im.image_size} px, grid {im.grid} ({im.regions} x {im.dim})"
        else:
            left = f"{im.source} features ({im.regions} x {im.dim})"
        limit = f" ≤{tx.max_tokens} tokens" if tx.max_tokens else ""
        where = f" {tx.name}" if tx.name else f" from {Path(tx.model_dir).name}" if tx.model_dir else ""
        return f"{left}; {tx.model_type}{where}{limit} ({tx.dim})"


def image_spec(backbone) -> ImageSpec:
    b = backbone.describe()
    return ImageSpec(source=str(b["name"]), regions=backbone.regions, dim=int(b["dim"]), grid=int(b["grid"]),
                     image_size=int(b["image_size"]), weights_sha256=str(b["weights_sha256"]))


def text_spec(encoder) -> TextSpec:
    d = encoder.describe()
    weights = ",".join(f"{w['name']}:{w['size']}" for w in d["weights"])
    return TextSpec(model_type=str(d["model_type"]), dim=int(d["dim"]), max_tokens=int(d["max_tokens"]),
                    config_sha256=str(d["config_sha256"]), weights=weights, model_dir=str(d["dir"]),
                    name=encoder.name)


def precomp_image_spec(path: Path, shape: tuple[int, ...], dtype: Any) -> ImageSpec:
    return ImageSpec(PRECOMP, int(shape[1]), int(shape[2]),
                     features_file=f"{Path(path).name} {tuple(int(s) for s in shape)} {dtype}")


def _short(value: Any) -> str:
    """A value for a message: names in full, hashes cut to their first 12 characters."""
    text = repr(value)
    return text[:14] + "…" if isinstance(value, str) and len(value) > 40 else text


def extraction_options(spec: FeatureSpec, grid: int | None = None, text_encoder: str | Path | None = None,
                       max_tokens: int | None = None, backbone: str | None = None,
                       image_size: int | None = None) -> dict[str, Any]:
    """`prepare_split` / `open_dataset` options that recompute `spec`'s features; an explicit
    option must agree with the spec (a flag that contradicts it is refused, not obeyed)."""
    from mmca.features.backbone import DEFAULT_BACKBONE
    from mmca.features.text_encoder import TEXT_ENCODERS

    im = spec.image
    photos = im.source not in (PRECOMP, ARRAYS)
    clashes = []
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
    recorded = Path(spec.text.model_dir) if spec.text.model_dir else None
    if encoder_dir is None and recorded is not None and recorded.is_absolute() and recorded.is_dir():
        encoder_dir = spec.text.model_dir
    elif encoder_dir is None and spec.text.name in TEXT_ENCODERS:
        encoder_dir = spec.text.name  # found by name; else the default, both checked against the spec below
    opts = {"backbone": im.source if photos else (backbone or DEFAULT_BACKBONE),
            "image_size": im.image_size if im.image_size is not None else image_size,
            "grid": im.grid if im.grid is not None else (grid or 6), "text_encoder": encoder_dir,
            "max_tokens": spec.text.max_tokens if spec.text.max_tokens is not None else (max_tokens or 64)}
    _precheck(spec, opts)
    return opts


def _precheck(spec: FeatureSpec, opts: dict[str, Any]) -> None:
    """Refuse extractors that would compute other features than `spec`'s before any feature is
    computed (reading a model's config and hashing the backbone weights take milliseconds)."""
    from mmca.features.backbone import BACKBONES
    from mmca.features.text_encoder import TextEncoder

    if spec.text.model_type != ARRAYS:
        found = FeatureSpec(spec.image, text_spec(TextEncoder(opts["text_encoder"], opts["max_tokens"])))
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


def image_backbone(opts: dict[str, Any]):
    """The `ImageBackbone` of `extraction_options`-style options."""
    from mmca.features.backbone import ImageBackbone

    return ImageBackbone(opts["grid"], opts["backbone"], opts["image_size"])
