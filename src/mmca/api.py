"""The Python API: a trained model on your own photos and sentences, in three lines.

    import mmca
    r = mmca.load("models/mmca-flickr8k")            # a model directory or a checkpoint .pt
    r.search("a dog runs on the beach", r.encode_images(["a.jpg", "b.jpg"]), k=5)

A `Retriever` holds the model, the feature spec it was trained with (backbone, input size,
grid, text encoder, token limit) and the scoring engine. `encode_images` / `encode_texts` run
the frozen extractors of that spec and turn the features into the engine's per-item banks
(a gallery); `score`, `topk` and `search` are exact under the full score S = i0·c0 + α·i1·c1
(the engine's pruned top-k gives the same results as scoring every pair). A gallery belongs to
the retriever that encoded it: banks are projections through that model's weights.

`open_index(dir)` opens a persistent index (`mmca index`) for the same queries as `mmca search`.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image

from mmca.checkpoint import load_model_and_spec
from mmca.data.dataset import TokenFeatures
from mmca.data.spec import ARRAYS, PRECOMP, FeatureSpec
from mmca.engine import ImageBank, ScoringEngine, TextBank
from mmca.engine.guards import full_fp32
from mmca.engine.heatmap import token_heatmap
from mmca.engine.precision import CHOICES, resolve_precision
from mmca.errors import ConfigError, DataError, MmcaError
from mmca.features.images import list_images, require_images
from mmca.features.options import FeatureOptions, FeatureRequest, extraction_options
from mmca.features.sentences import is_unicode_text, wordless
from mmca.hardware import usable_device
from mmca.search import Searcher

ImageLike = Union[str, Path, Image.Image]
_owners = itertools.count()


@dataclass(frozen=True)
class Hit:
    """One search result: its position in the gallery, its full score S, and what it is (an
    image's name, or a caption's text)."""

    index: int
    score: float
    item: str


@dataclass
class ImageGallery:
    """Encoded images: the engine's per-item bank, the names (file names, or "0", "1", ...)
    and the paths of photos (None for arrays)."""

    bank: ImageBank
    names: list[str]
    paths: list[Path | None]
    owner: int  # the Retriever that encoded it

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class TextGallery:
    """Encoded sentences: the engine's per-item bank, the texts and their token states."""

    bank: TextBank
    texts: list[str]
    tokens: TokenFeatures
    ids: list[list[int]]  # token ids per sentence ([CLS] ... [SEP])
    owner: int

    def __len__(self) -> int:
        return len(self.texts)


class Retriever:
    """A trained MMCA model with its feature spec and scoring engine (see the module doc).

    The model is moved to `device` and put in eval mode (in place). The frozen extractors (image
    backbone, text encoder) run on the CPU; the banks, scores and searches on `device`.
    `text_encoder`: the folder of the encoder the model was trained with, where it is not the
    installed default (checked against the spec before use)."""

    def __init__(self, model, spec: FeatureSpec, device: str | torch.device | None = None,
                 precision: str = "auto", source: str | None = None, text_encoder: str | Path | None = None):
        if precision not in CHOICES:
            raise ConfigError(f"precision must be one of {', '.join(CHOICES)}, not {precision!r}")
        device = _device(device)
        self.choice = resolve_precision(precision, device, exact=True)
        self.model = model.to(device).eval()
        self.spec, self.device, self.source = spec, device, source
        self.text_encoder_dir = text_encoder
        self.engine = ScoringEngine(self.model, device, self.choice.precision)
        self.owner = next(_owners)
        self._extractors: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"Retriever({self.source or 'in-memory model'}; {self.spec.describe()}; {self.choice.precision})"

    # ---- the frozen extractors of the spec (built on first use, checked against the spec) -----
    def _options(self) -> FeatureOptions:
        if "options" not in self._extractors:
            # refuses extractors that differ from the spec's
            request = FeatureRequest(text_encoder=self.text_encoder_dir)
            self._extractors["options"] = extraction_options(self.spec, request)
        return self._extractors["options"]

    @property
    def backbone(self):
        if self.spec.image.source in (PRECOMP, ARRAYS):
            raise MmcaError(f"this model was trained on {self.spec.image.source} region features, not photos",
                            f"pass region features (N x {self.spec.image.regions} x {self.spec.image.dim}) "
                            "to encode_images")
        if "backbone" not in self._extractors:
            self._extractors["backbone"] = self._options().image_backbone()
        return self._extractors["backbone"]

    @property
    def text_encoder(self):
        if self.spec.text.model_type == ARRAYS:
            raise MmcaError("this model's text features are of unknown provenance: no text encoder to run",
                            "use a model trained with `mmca train`")
        if "text" not in self._extractors:
            self._extractors["text"] = self._options().encoder()
        return self._extractors["text"]

    # ---- encoding ---------------------------------------------------------------------------
    def encode_images(self, images: ImageLike | Sequence[ImageLike] | np.ndarray | torch.Tensor,
                      batch_size: int = 2, progress: bool = False) -> ImageGallery:
        """A gallery of images: photo files (or a folder of them), PIL images, or region features
        (an array (N, k, D_img), or (k, D_img) for one image) of this model's spec."""
        if isinstance(images, (np.ndarray, torch.Tensor)):
            regions = self._check_regions(images)
            names = [str(i) for i in range(len(regions))]
            return self._image_gallery(regions, names, [None] * len(names))
        if isinstance(images, (bytes, bytearray, memoryview)):
            raise DataError("cannot encode raw bytes as images",
                            "pass a file path, or open the bytes first: PIL.Image.open(io.BytesIO(data))")
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        try:
            items = list(images)
        except TypeError:
            raise DataError(f"cannot encode {type(images).__name__} as images",
                            "pass file paths, a folder, PIL images, or one array of region features") from None
        paths: list[Path | None] = []
        photos: list[Any] = []
        for item in items:
            if isinstance(item, (str, Path)) and Path(item).is_dir():
                found = list_images(Path(item))
                photos += found
                paths += found
            elif isinstance(item, (str, Path)) and not Path(item).exists():
                raise DataError(f"image not found: {item}", "pass the path of an existing photo")
            elif isinstance(item, (str, Path, Image.Image)):
                photos.append(Path(item) if isinstance(item, (str, Path)) else item)
                paths.append(Path(item) if isinstance(item, (str, Path)) else None)
            else:
                raise DataError(f"cannot encode {type(item).__name__} as an image",
                                "pass file paths, PIL images, or one array of region features")
        if not photos:
            raise DataError("no images to encode", "pass at least one photo (or a folder that holds photos)")
        regions = self._extract(photos, batch_size, progress)
        names = [p.name if p is not None else str(i) for i, p in enumerate(paths)]
        return self._image_gallery(regions, names, paths)

    def _check_regions(self, regions: np.ndarray | torch.Tensor) -> torch.Tensor:
        _require_real(regions)
        x = torch.as_tensor(regions).float().cpu()
        if x.dim() == 2:
            x = x[None]
        want = (self.spec.image.regions, self.spec.image.dim)
        if x.dim() != 3 or tuple(x.shape[1:]) != want or len(x) == 0:
            raise DataError(f"region features of shape {tuple(x.shape)}; this model needs (N, {want[0]}, {want[1]})",
                            f"pass features of the model's spec: {self.spec.describe()}")
        return x

    def _extract(self, photos: list[Any], batch_size: int, progress: bool) -> torch.Tensor:
        """Region features of photos, as `mmca index` computes them (same decoding and resizing)."""
        backbone = self.backbone
        files = [p for p in photos if isinstance(p, Path)]
        require_images(files)  # by content, before any feature is computed
        out = np.empty((len(photos), backbone.regions, self.spec.image.dim), dtype=np.float32)
        if len(files) == len(photos):
            backbone.extract_files(files, out, batch_size=batch_size, progress=progress)
            return torch.from_numpy(out)
        for i, photo in enumerate(photos):
            if isinstance(photo, Path):
                backbone.extract_files([photo], out[i:i + 1])
            else:
                rgb = torch.from_numpy(backbone.fit_photo(_decoded(photo, i))).permute(2, 0, 1)[None]
                out[i] = backbone.extract_grid(rgb).float().numpy()[0]
        return torch.from_numpy(out)

    def _image_gallery(self, regions: torch.Tensor, names: list[str], paths: list[Path | None]) -> ImageGallery:
        bank = self.engine.image_bank(regions)
        return ImageGallery(bank, names, paths, self.owner)

    def encode_texts(self, texts: Sequence[str], progress: bool = False) -> TextGallery:
        """A gallery of sentences (token states of the spec's text encoder, then the banks)."""
        if isinstance(texts, str):
            raise DataError("encode_texts takes a list of sentences, not one string",
                            f"wrap it in a list: encode_texts([{texts[:30]!r}])")
        try:
            texts = list(texts)
        except TypeError:
            raise DataError(f"encode_texts takes a list of sentences, not {type(texts).__name__}") from None
        if not texts:
            raise DataError("no sentences to encode", "pass a non-empty list of strings")
        for j, t in enumerate(texts):
            if not isinstance(t, str):
                raise DataError(f"sentence {j} is a {type(t).__name__}, not a string", "pass strings only")
            if not t.strip():
                raise DataError(f"sentence {j} is empty", "remove empty sentences (they carry no query)")
            if not is_unicode_text(t):
                raise DataError(f"sentence {j} is not valid Unicode text (it holds a lone surrogate)",
                                "pass text decoded from UTF-8 (e.g. bytes.decode('utf-8'))")
        ids, _ = self.text_encoder.tokenize(texts)
        empty = wordless(ids, self.text_encoder.tokenizer)
        if empty:
            which = (f"sentence {empty[0]} has" if len(empty) == 1
                     else f"sentences {', '.join(map(str, empty[:5]))} have")
            raise DataError(f"{which} no visible characters (only control, zero-width or space characters)",
                            "remove them (they carry no query)")
        tokens = self.text_encoder.encode_ids(ids, progress=progress)
        return TextGallery(self.engine.text_bank(tokens), texts, tokens, ids, self.owner)

    # ---- scores and search ------------------------------------------------------------------
    def _require_own(self, gallery: ImageGallery | TextGallery, kind: type) -> None:
        if not isinstance(gallery, kind):
            raise DataError(f"expected {'an' if kind is ImageGallery else 'a'} {kind.__name__}, "
                            f"got {type(gallery).__name__}",
                            f"build it with {'encode_images' if kind is ImageGallery else 'encode_texts'}")
        if gallery.owner != self.owner:
            raise MmcaError("this gallery was encoded by another model (its banks are that model's projections)",
                            "encode the images/sentences again with this retriever")

    @torch.no_grad()
    def score(self, images: ImageGallery, texts: TextGallery) -> torch.Tensor:
        """The full score matrix S (N images x M sentences), every pair through the cross unit."""
        self._require_own(images, ImageGallery)
        self._require_own(texts, TextGallery)
        with full_fp32():  # the same float32 products as the exact top-k (no TF32 on GPUs)
            return self.engine.full_scores(images.bank, texts.bank).cpu()

    @torch.no_grad()
    def topk(self, queries: ImageGallery | TextGallery, gallery: ImageGallery | TextGallery,
             k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query, the exact top-k of the gallery under S -> (scores, indices), both
        (queries, k'), k' = min(k, len(gallery)); ties go to the lower index. Sentences
        query images, images query sentences."""
        k = _positive(k)
        if isinstance(queries, TextGallery):
            self._require_own(queries, TextGallery)
            self._require_own(gallery, ImageGallery)
            s, i = self.engine.topk_images(gallery.bank, queries.bank, min(k, len(gallery)))
        else:
            self._require_own(queries, ImageGallery)
            self._require_own(gallery, TextGallery)
            s, i = self.engine.topk_captions(queries.bank, gallery.bank, min(k, len(gallery)))
        return s.cpu(), i.cpu()

    def search(self, query: str | Path | Image.Image, gallery: ImageGallery | TextGallery,
               k: int = 10) -> list[Hit]:
        """A sentence (a `str`) against a gallery of images, or a photo (a `Path` or a PIL
        image) against a gallery of sentences: the exact top-k, best first. A string is always
        a sentence, whatever files exist: pass a photo as `Path("photo.jpg")`."""
        if isinstance(query, str) and isinstance(gallery, ImageGallery):
            queries = self.encode_texts([query])
            label = gallery.names
        elif isinstance(query, (Path, Image.Image)) and isinstance(gallery, TextGallery):
            queries = self.encode_images(query)
            label = gallery.texts
        else:
            what = "a sentence (str)" if isinstance(query, str) else \
                ("a photo" if isinstance(query, (Path, Image.Image)) else f"a {type(query).__name__}")
            raise DataError(f"cannot search {'an' if isinstance(gallery, ImageGallery) else 'a'} "
                            f"{type(gallery).__name__} with {what}",
                            "search an ImageGallery with a sentence (str), a TextGallery with a photo "
                            "(pathlib.Path or PIL image)")
        if len(queries) != 1:
            raise DataError(f"one query expected, got {len(queries)}", "use topk() for many queries at once")
        scores, ids = self.topk(queries, gallery, k)
        return [Hit(int(j), float(v), label[int(j)]) for v, j in zip(scores[0].tolist(), ids[0].tolist())]

    def heatmap(self, sentence: str, images: ImageGallery, index: int) -> dict[str, Any]:
        """Where each word of `sentence` looks in image `index`: the cross unit's attention of
        each token over the image's regions (averaged over heads) -> tokens, weights
        (tokens x regions; a row's remaining mass goes to the sentence's own tokens),
        region_mass (per token), the grid side, and the pair's score."""
        self._require_own(images, ImageGallery)
        index = _integer(index, "index")
        if not 0 <= index < len(images):
            raise DataError(f"no image {index} in a gallery of {len(images)}")
        texts = self.encode_texts([sentence])
        return token_heatmap(self.engine, self.text_encoder.tokenizer, texts.ids[0], texts.tokens, texts.bank,
                             images.bank, index)


def _device(device: str | torch.device | None) -> torch.device:
    """The device asked for (default: cuda if there is one), checked before any model is moved."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return usable_device(device)


def _require_real(regions: np.ndarray | torch.Tensor) -> None:
    """Region features are real numbers: complex ones would lose their imaginary part in the
    cast to float, and bools or objects are not features."""
    if isinstance(regions, np.ndarray):
        ok = regions.dtype.kind in "iuf"
    else:
        ok = not regions.is_complex() and regions.dtype != torch.bool
    if not ok:
        raise DataError(f"region features of dtype {regions.dtype}; real numbers expected",
                        "pass float (or integer) region features")


def _decoded(photo: Image.Image, i: int) -> Image.Image:
    """A PIL image's pixels, decoded now: a truncated or corrupt file is a clean error."""
    try:
        photo.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"image {i} (a PIL image) cannot be decoded: {err}",
                        "pass a complete image file, or open it again from an intact copy") from err
    return photo


def _integer(x: Any, name: str) -> int:
    """An int (numpy integers included; bools and floats refused)."""
    if isinstance(x, bool):
        raise DataError(f"{name} must be an integer, not {x!r}")
    try:
        return operator.index(x)
    except TypeError:
        raise DataError(f"{name} must be an integer, not {x!r}") from None


def _positive(k: Any) -> int:
    k = _integer(k, "k")
    if k < 1:
        raise DataError(f"k must be a positive integer, not {k!r}")
    return k


def load(path: str | Path, device: str | torch.device | None = None, precision: str = "auto",
         text_encoder: str | Path | None = None) -> Retriever:
    """A retriever from a model directory (`mmca export`) or a checkpoint (`mmca train`).
    precision "auto" is float32 for exact scores; "bf16" is obeyed (approximate).
    text_encoder: the encoder's folder, where the model was trained with another than the
    installed default."""
    model, spec, _ = load_model_and_spec(path)
    return Retriever(model, spec, device=device, precision=precision, source=str(path), text_encoder=text_encoder)


def open_index(path: str | Path, checkpoint: str | Path | None = None,
               text_encoder: str | Path | None = None) -> Searcher:
    """A persistent index (`mmca index`) with its model, on the CPU: `search_text(sentence, k)`,
    `search_image_file(path, k)`, ... exactly as `mmca search` and the web page run them; each
    returns (results as dicts, SearchStats)."""
    return Searcher(path, checkpoint, text_encoder=text_encoder)


__all__ = ["Hit", "ImageGallery", "Retriever", "TextGallery", "load", "open_index"]
