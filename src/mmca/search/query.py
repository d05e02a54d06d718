"""Queries over an index: sentence -> images and image -> captions, exact under the full MMCA
score, and the cross unit's word-to-region attention of one (sentence, image) pair.

Text -> images. The caption side is one sentence: the text encoder runs once, then the engine
turns it into a one-caption `TextBank`. The gallery side is the index's `ImageBank` fields:

- resident (default when the float32 bank fits in `resident_limit` bytes): the whole bank is
  in memory and `ScoringEngine.topk_images` runs on it directly;
- memory-mapped (large galleries): i0 of every image is in memory; the images are ranked by
  i0·c0 and gathered from the memory-mapped shards in chunks of doubling size. The engine's
  exact top-k of each chunk is merged into the running top k, and the walk stops once the
  k-th best full score is above the upper bound i0·c0 + α of every image not yet gathered:
  no such image can enter the top k (the bound of docs/engine.md), so the result equals the engine's
  top-k over the whole gallery. Ties break by the lower id, as in the engine.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmca.checkpoint import load_model_and_spec
from mmca.engine import ImageBank, ScoringEngine
from mmca.engine.heatmap import token_heatmap
from mmca.errors import DataError, MmcaError
from mmca.features.backbone import MIN_SIDE, fit_photo
from mmca.features.images import IMAGE_FORMATS, IMAGE_TYPES
from mmca.features.sentences import is_unicode_text, wordless
from mmca.search.index import GalleryIndex

MAX_QUERY_CHARS = 1000
MAX_K = 100
MAX_SIDE = 12000
MAX_PIXELS = 50_000_000
MAX_SERVED_BYTES = 64 * 1024 * 1024
MAX_UPLOAD_BYTES = 16 * 1024 * 1024


class QueryError(MmcaError):
    """A query the user sent is not acceptable (the server answers 4xx)."""

    def __init__(self, message: str, hint: str | None = None, status: int = 400):
        super().__init__(message, hint)
        self.status = status


def check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise QueryError("the query must be a string")
    if not is_unicode_text(text):
        raise QueryError("the query is not valid Unicode text (it holds a lone surrogate or bytes that "
                         "are not UTF-8)", "type the sentence as plain UTF-8 text")
    text = text.strip()
    if not text:
        raise QueryError("the query is empty", "type a sentence describing the photo")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"the query has {len(text)} characters; at most {MAX_QUERY_CHARS} are accepted",
                         "shorten the sentence", status=413)
    return text


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise QueryError(f"k must be an integer between 1 and {MAX_K}")
    return k


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Untrusted image bytes -> a size x size network input (see `fit_photo`), with the size checked from the header
    before any pixel is decoded (a 20,000 x 20,000 file is refused without decoding it)."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise QueryError(f"the image is {len(data)} bytes; at most {MAX_UPLOAD_BYTES} are accepted", status=413)
    if not data:
        raise QueryError("the image is empty")
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as err:
        raise QueryError(f"the image is too large: {err}", status=413) from err
    except (OSError, ValueError) as err:
        raise QueryError("the file is not an image (JPEG, PNG, WEBP, BMP or GIF expected)",
                         status=415) from err
    with im:
        if im.format not in IMAGE_FORMATS:
            raise QueryError(f"unsupported image format {im.format}; use one of {', '.join(IMAGE_FORMATS)}", status=415)
        w, h = im.size
        if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
            raise QueryError(f"the image is {w}x{h} pixels; at most {MAX_SIDE} a side and "
                             f"{MAX_PIXELS:,} pixels are accepted", status=413)
        if w < MIN_SIDE or h < MIN_SIDE:
            raise QueryError(f"the image is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
        try:
            if im.format == "JPEG":
                im.draft("RGB", (2 * size, 2 * size))  # decode at a reduced scale: faster
            return fit_photo(im, size)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise QueryError(f"the image cannot be decoded: {err}", status=415) from err


@dataclass
class SearchStats:
    ms: float = 0.0
    candidates: int = 0
    pair_passes: int = 0
    extra: dict = field(default_factory=dict)


class Searcher:
    """An index with its model, engine, text encoder and (lazily) image backbone, resident in
    one process. Thread-safe: the model work runs under one lock (the CPU has 2 cores; the
    tokenizer is not reentrant)."""

    first_chunk = 64  # images gathered first from a memory-mapped gallery (then doubling)

    def __init__(self, index: str | Path | GalleryIndex, checkpoint: str | Path | None = None,
                 resident: bool | None = None, resident_limit: int = 4 << 30,
                 text_encoder: str | Path | None = None):
        self.index = index if isinstance(index, GalleryIndex) else GalleryIndex(index)
        self.checkpoint = self.index.resolve_checkpoint(checkpoint)
        self.model, trained_on, _ = load_model_and_spec(self.checkpoint)
        trained_on.require_match(self.index.spec, f"checkpoint {self.checkpoint}", f"index {self.index.path}")
        self.engine = ScoringEngine(self.model, "cpu", "fp32")
        meta = self.index.meta
        self.options = self.index.extraction_options(text_encoder)  # the installed encoder checked too
        self.encoder = self.options.encoder()
        self.i0 = self.index.i0()
        n = self.index.num_images
        fp32_bytes = self.index.storage_bytes * (2 if meta.get("storage") == "fp16" else 1)
        self.resident = (fp32_bytes <= resident_limit) if resident is None else bool(resident)
        self.bank = ImageBank(**self.index.all_images()) if self.resident and n else None
        tokens = self.index.caption_tokens()
        self.caption_bank = self.engine.text_bank(tokens) if tokens is not None else None
        self._backbone = None
        self.lock = threading.RLock()
        self.decoding = threading.BoundedSemaphore(2)

    # ---- helpers -----------------------------------------------------------------------
    @property
    def backbone(self):
        if self._backbone is None:
            if not self.index.has_photos:
                raise QueryError("this index holds precomputed features: image queries need an index built from images",
                                 status=409)
            self._backbone = self.options.image_backbone()
        return self._backbone

    def _encode(self, text: str):
        ids, _ = self.encoder.tokenize([text])
        if wordless(ids, self.encoder.tokenizer):
            raise QueryError("the query has no visible characters (only control, zero-width or space characters)",
                             "type a sentence describing the photo")
        tokens = self.encoder.encode_ids(ids)
        tb = self.engine.text_bank(tokens)
        return ids[0], tokens, tb

    # ---- text -> images ----------------------------------------------------------------
    @torch.no_grad()
    def search_text(self, text: str, k: int = 10) -> tuple[list[dict[str, Any]], SearchStats]:
        text, k = check_text(text), check_k(k)
        if self.index.num_images == 0:
            raise QueryError("the index holds no images", status=409)
        with self.lock:
            t0 = time.perf_counter()
            passes0 = self.engine.pair_passes
            _, _, tb = self._encode(text)
            t_enc = time.perf_counter()
            k = min(k, self.index.num_images)
            if self.resident:
                s, i = self.engine.topk_images(self.bank, tb, k)
                scores, ids, cand = s[0], i[0], self.index.num_images
            else:
                scores, ids, cand = self._topk_gathered(tb, k)
            stats = SearchStats((time.perf_counter() - t0) * 1e3, cand, self.engine.pair_passes - passes0,
                                {"encode_ms": (t_enc - t0) * 1e3})
        return [self._image_result(int(j), float(v)) for v, j in zip(scores.tolist(), ids.tolist())], stats

    def _topk_gathered(self, tb, k: int):
        return gathered_topk(self.engine, self.i0, lambda ids: ImageBank(**self.index.image_rows(ids)),
                             tb, k, self.first_chunk)

    def _image_result(self, j: int, score: float) -> dict[str, Any]:
        return {"id": j, "score": score, "name": self.index.image_names[j],
                "has_file": self.index.image_paths[j] is not None}

    # ---- image -> captions -------------------------------------------------------------
    def _caption_results(self, bank: ImageBank, k: int) -> tuple[list[dict[str, Any]], SearchStats]:
        if self.caption_bank is None:
            raise QueryError("the index holds no captions to rank",
                             "add a caption set: `mmca index --add --captions FILE --index DIR`", status=409)
        t0 = time.perf_counter()
        passes0 = self.engine.pair_passes
        k = min(k, len(self.index.captions))
        s, i = self.engine.topk_captions(bank, self.caption_bank, k)
        stats = SearchStats((time.perf_counter() - t0) * 1e3, len(self.index.captions),
                            self.engine.pair_passes - passes0)
        out = []
        for v, j in zip(s[0].tolist(), i[0].tolist()):
            img = int(self.index.caption_image[j])
            out.append({"id": int(j), "score": float(v), "text": self.index.captions[j],
                        "image": None if img < 0 else img})
        return out, stats

    @torch.no_grad()
    def search_image_array(self, rgb: np.ndarray, k: int = 10):
        """(H, W, 3) uint8 RGB (e.g. from `decode_image`) -> top-k captions."""
        k = check_k(k)
        with self.lock:
            t0 = time.perf_counter()
            x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
            regions = self.backbone.extract_grid(x).float()
            bank = self.engine.image_bank(regions)
            res, stats = self._caption_results(bank, k)
            stats.ms = (time.perf_counter() - t0) * 1e3
            return res, stats

    def search_image_bytes(self, data: bytes, k: int = 10):
        size = self.backbone.image_size  # (first: an index of precomputed features takes no photo)
        with self.decoding:  # at most two uploads decoded at once: each may take ~MAX_PIXELS x 4 bytes
            photo = decode_image(data, size)
        return self.search_image_array(photo, k)

    def search_image_file(self, path: str | Path, k: int = 10):
        path = Path(path)
        if path.is_dir():
            raise DataError(f"{path} is a directory, not an image file",
                            "pass one image file (to index a folder: `mmca index --images FOLDER`)")
        if not path.is_file():
            raise DataError(f"image not found: {path}", "pass the path of an image file")
        try:
            return self.search_image_bytes(path.read_bytes(), k)
        except QueryError as err:
            raise DataError(f"{path}: {err.message}", err.hint) from err

    @torch.no_grad()
    def search_gallery_image(self, image_id: int, k: int = 10):
        image_id, k = self.check_image_id(image_id), check_k(k)
        with self.lock:
            t0 = time.perf_counter()
            bank = ImageBank(**self.index.image_rows([image_id]))
            res, stats = self._caption_results(bank, k)
            stats.ms = (time.perf_counter() - t0) * 1e3
            return res, stats

    def check_image_id(self, image_id: Any) -> int:
        if isinstance(image_id, bool) or not isinstance(image_id, int) or not 0 <= image_id < self.index.num_images:
            raise QueryError(f"no image {image_id!r} in this gallery", status=404)
        return image_id

    def image_path(self, image_id: Any) -> Path:
        """The real path of a gallery image: resolved (symlinks followed), a regular file, and
        inside one of the gallery roots recorded at build time; anything else is refused."""
        image_id = self.check_image_id(image_id)
        p = self.index.image_paths[image_id]
        try:
            real = Path(p).resolve(strict=True) if isinstance(p, str) else None
        except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, a NUL byte
            real = None
        if real is None or not real.is_file():
            raise QueryError(f"the file of image {image_id} is not available", status=404)
        if not any(real == root or root in real.parents for root in self.index.gallery_roots):
            raise QueryError(f"image {image_id} lies outside the gallery; it is not served", status=403)
        return real

    def image_file(self, image_id: Any) -> tuple[bytes, str]:
        """The bytes of a gallery image and its content type, decided by decoding the file
        (never by its name): a file that is not an image of a known format is refused."""
        path = self.image_path(image_id)
        if path.stat().st_size > MAX_SERVED_BYTES:
            raise QueryError(f"image {image_id} is larger than {MAX_SERVED_BYTES} bytes; it is not served", status=403)
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
        except (OSError, ValueError, Image.DecompressionBombError):
            fmt = None
        if fmt not in IMAGE_TYPES:
            raise QueryError(f"the file of image {image_id} is not an image ({', '.join(IMAGE_TYPES)} expected)",
                             status=415)
        return data, IMAGE_TYPES[fmt]

    # ---- heat map ----------------------------------------------------------------------
    @torch.no_grad()
    def heatmap(self, text: str, image_id: int) -> dict[str, Any]:
        """For each token of `text`: the cross unit's attention (averaged over heads) of its row
        over the region keys of image `image_id` -> weights (n_tokens, k) and the grid side."""
        text, image_id = check_text(text), self.check_image_id(image_id)
        with self.lock:
            ids, tokens, tb = self._encode(text)
            hm = token_heatmap(self.engine, self.encoder.tokenizer, ids, tokens, tb, self.bank_for([image_id]), 0)
        known = [self.index.captions[j] for j in np.nonzero(self.index.caption_image == image_id)[0]]
        return {**hm, "image": image_id, "name": self.index.image_names[image_id],
                "regions": hm["weights"].shape[1], "weights": hm["weights"].tolist(),
                "region_mass": hm["region_mass"].tolist(), "captions": known}

    def warm_up(self) -> float:
        """Run every kind of query once (text encoder, engine, heat map, and the image backbone
        when the index has photos), so the first user's query is as fast as the rest: loading
        the models and the first kernels' set-up took ~18 s on a busy 2-core CPU. -> seconds."""
        t0 = time.perf_counter()
        if self.index.num_images:
            self.search_text("a photo", 1)
            self.heatmap("a photo", 0)
            if self.caption_bank is not None:
                self.search_gallery_image(0, 1)
        if self.index.has_photos:
            with self.lock, torch.no_grad():
                side = self.backbone.image_size
                self.backbone.extract_grid(torch.full((1, 3, side, side), 128, dtype=torch.uint8))
        return time.perf_counter() - t0

    def bank_for(self, ids) -> ImageBank:
        return ImageBank(**self.index.image_rows(ids))

    def info(self) -> dict[str, Any]:
        """What the page shows about the index: counts and identities, no absolute paths (a
        page must not learn where the user's files live)."""
        d = self.index.describe()
        d["path"] = Path(d["path"]).name
        d["checkpoint"] = {"name": Path(d["checkpoint"]["path"]).name, "sha256": d["checkpoint"]["sha256"]}
        d.update({"resident": self.resident, "max_query_chars": MAX_QUERY_CHARS, "max_k": MAX_K,
                  "max_upload_bytes": MAX_UPLOAD_BYTES})
        return d


def gathered_topk(engine: ScoringEngine, i0: torch.Tensor, rows, tb, k: int, first_chunk: int = 64):
    """Exact top-k images of the one caption of `tb` over a gallery held out of memory: `i0`
    (N, d) of every image, `rows(ids)` -> the ImageBank of those images (e.g. read from the
    index's memory-mapped shards). Candidates come in falling i0·c0 order, in chunks of
    doubling size; each chunk's exact top-k is merged into the running one, so every
    candidate's cross unit runs at most once -> (scores (k,), ids (k,), images gathered)."""
    g = i0 @ tb.c0[0]
    gs, order = torch.sort(g, descending=True, stable=True)
    slack = engine.slack
    ncand = int((gs + slack >= gs[k - 1] - slack).sum())
    best_s, best_i = torch.empty(0), torch.empty(0, dtype=torch.long)
    start, stop = 0, min(ncand, max(4 * k, first_chunk))
    while True:
        ids = torch.sort(order[start:stop]).values
        s, i = engine.topk_images(rows(ids.numpy()), tb, min(k, len(ids)))
        best_s, best_i = merge_topk(best_s, best_i, s[0], ids[i[0]], k)
        if stop >= ncand or float(best_s[k - 1]) > float(gs[stop]) + slack:
            return best_s, best_i, stop
        start, stop = stop, min(ncand, 2 * stop)


def merge_topk(scores_a: torch.Tensor, ids_a: torch.Tensor, scores_b: torch.Tensor, ids_b: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of two scored id sets, by falling score and then rising id (the engine's
    tie order), so merging chunk-wise top-k lists equals one top-k over their union."""
    scores, ids = torch.cat([scores_a, scores_b]), torch.cat([ids_a, ids_b])
    keep = torch.from_numpy(np.lexsort((ids.numpy(), -scores.numpy()))[:k])
    return scores[keep], ids[keep]


