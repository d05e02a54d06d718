"""The feature spec: what a model's inputs were computed with, carried by every checkpoint and
index so that no job silently feeds a model features of another kind.

A model trained on 7x7 grids still runs on 6x6 ones (its image side mean-pools any number of
regions), and one trained on MiniLM token states runs on any 384-d states: nothing in the
weights says what they were trained on. The spec does. `evaluate`, `index`, `bench` and
`--init-from` adopt it and refuse data whose spec differs (`require_match`).

Two specs match when everything that decides the feature values agrees: for images the
backbone, its weights, input size, grid and precision (or, for precomp features, the region
count and width); for text the encoder's type, config, weights, token limit and precision (fp32,
bf16 or int8: features computed another way are another feature set). Specs written before the
precision was recorded read as fp32, the only precision mmca extracted in then. Where a file was found
(the encoder's directory, the precomp file) and whether training used mirrored views are
recorded as provenance, not compared.

A value type of the data layer: it reads what extractors say of themselves (`describe()`) and
imports none of them; `mmca.features.options` turns a spec back into the extractors.
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
    precision: str = "fp32"  # what the backbone computed in (mmca.features.precision)
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
    precision: str = "fp32"  # what the encoder computed in (mmca.features.precision)

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
        return f"{left}{_in(im.precision)}; {tx.model_type}{where}{limit} ({tx.dim}){_in(tx.precision)}"


def image_spec(backbone) -> ImageSpec:
    b = backbone.describe()
    return ImageSpec(source=str(b["name"]), regions=backbone.regions, dim=int(b["dim"]), grid=int(b["grid"]),
                     image_size=int(b["image_size"]), weights_sha256=str(b["weights_sha256"]),
                     precision=str(b.get("precision", "fp32")))


def text_spec(encoder) -> TextSpec:
    d = encoder.describe()
    weights = ",".join(f"{w['name']}:{w['size']}" for w in d["weights"])
    return TextSpec(model_type=str(d["model_type"]), dim=int(d["dim"]), max_tokens=int(d["max_tokens"]),
                    config_sha256=str(d["config_sha256"]), weights=weights, model_dir=str(d["dir"]),
                    name=encoder.name, precision=str(d.get("precision", "fp32")))


def precomp_image_spec(path: Path, shape: tuple[int, ...], dtype: Any) -> ImageSpec:
    return ImageSpec(PRECOMP, int(shape[1]), int(shape[2]),
                     features_file=f"{Path(path).name} {tuple(int(s) for s in shape)} {dtype}")


def _in(precision: str) -> str:
    return "" if precision == "fp32" else f" in {precision}"


def _short(value: Any) -> str:
    """A value for a message: names in full, hashes cut to their first 12 characters."""
    text = repr(value)
    return text[:14] + "…" if isinstance(value, str) and len(value) > 40 else text
