"""Build an index from a prepared dataset split or a folder of images, or append to one."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mmca.checkpoint import checkpoint_identity, load_model, load_model_and_spec
from mmca.data.dataset import TokenFeatures
from mmca.data.spec import FeatureSpec
from mmca.engine import ScoringEngine
from mmca.engine.bank import ImageBank
from mmca.errors import CheckpointError, DataError, MmcaError
from mmca.features.images import file_identity, list_images, require_images, unique_files
from mmca.features.options import FeatureRequest, extraction_options
from mmca.features.prepare import prepare_split
from mmca.features.sentences import wordless
from mmca.search.index import STORAGE, GalleryIndex, IndexWriter, require_index_out


def _check_dims(model, img_dim: int, txt_dim: int, ckpt: Path) -> None:
    c = model.config
    if c.img_dim != img_dim or c.txt_dim != txt_dim:
        raise CheckpointError(
            f"checkpoint {ckpt} expects region features of {c.img_dim} and token states of "
            f"{c.txt_dim}, but the gallery has {img_dim} and the text encoder {txt_dim}",
            "use the checkpoint trained on these features (same backbone and text encoder)")


def _meta(ckpt: Path, model, spec: FeatureSpec, storage: str, source: dict[str, Any]) -> dict[str, Any]:
    """An index's metadata: the model's identity and the features' spec identify it."""
    if storage not in STORAGE:
        raise MmcaError(f"storage must be one of {sorted(STORAGE)}, not {storage!r}")
    return {
        "checkpoint": checkpoint_identity(ckpt),
        "model_config": model.config.to_dict(),
        "feature_spec": spec.to_dict(),
        "storage": storage,
        "source": source,
        "created": time.time(),
    }


def _read_captions(path: Path | None, names: Sequence[str]) -> tuple[list[str], list[int | None]]:
    """captions.tsv (`filename<TAB>caption`) or plain lines (captions of no image)."""
    if path is None:
        return [], []
    path = Path(path)
    if not path.is_file():
        raise DataError(f"captions file not found: {path}", "pass a captions.tsv or a text file, one caption a line")
    by_name = {n: i for i, n in enumerate(names)}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a leading BOM is not text
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})",
                        "convert it, e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`") from err
    texts, images, unknown = [], [], []
    for line in lines:
        if not line.strip():
            continue
        if "\t" in line:
            name, text = line.split("\t", 1)
            if name not in by_name:
                unknown.append(name)  # a caption of an image not in this gallery
                continue
            image = by_name[name]
        else:
            text, image = line, None
        if text.strip():
            texts.append(text.strip())
            images.append(image)
    if unknown:
        warnings.warn(f"{path}: {len(unknown)} caption(s) name {len(set(unknown))} file(s) that are not in "
                      f"the gallery (e.g. {unknown[0]!r}); they were skipped", stacklevel=2)
    return texts, images


def _encode_captions(encoder, texts: list[str], images: list[int | None], source: Path | None,
                     progress: bool) -> tuple[list[str], list[int | None], TokenFeatures | None]:
    """The captions' token states, leaving out (with a warning) the captions that hold no words
    (only control, zero-width or space characters), which would match every image by nothing."""
    if not texts:
        return texts, images, None
    ids, _ = encoder.tokenize(texts)
    empty = set(wordless(ids, encoder.tokenizer))
    if empty:
        first = texts[min(empty)]
        warnings.warn(f"{source}: {len(empty)} caption(s) hold no words, only control, zero-width or space "
                      f"characters (e.g. {first!r}); they were skipped", stacklevel=3)
        keep = [j for j in range(len(texts)) if j not in empty]
        texts, images, ids = [texts[j] for j in keep], [images[j] for j in keep], [ids[j] for j in keep]
    if not texts:
        return texts, images, None
    return texts, images, encoder.encode_ids(ids, progress=progress)


def build_from_dataset(out: str | Path, checkpoint: str | Path, root: str | Path, split: str,
                       limit: int | None = None, storage: str = "fp16", features: FeatureRequest = FeatureRequest(),
                       overwrite: bool = False, progress: bool = True) -> GalleryIndex:
    """Index a prepared split (its cached features; computed now if missing) with the features
    the checkpoint was trained on: what `features` leaves at None adopts the checkpoint's, a
    value that contradicts it is refused. `limit`: the first `limit` images and their captions
    only."""
    require_index_out(out, overwrite, inputs=(root, checkpoint))  # before any feature is computed
    ckpt = Path(checkpoint)
    model, spec, _ = load_model_and_spec(ckpt)
    prepared = prepare_split(root, split, extraction_options(spec, features), progress=progress)
    ds = prepared.dataset
    spec.require_match(ds.spec, f"checkpoint {ckpt}", f"{root}, split {split}")
    _check_dims(model, ds.image_features.shape[2], ds.token_features.dim, ckpt)
    n = ds.num_images if limit is None else min(int(limit), ds.num_images)
    cap = np.nonzero(ds.caption_image < n)[0]
    engine = ScoringEngine(model, "cpu")
    meta = _meta(ckpt, model, ds.spec, storage,
                 {"kind": "dataset", "root": str(Path(root).resolve()), "split": split, "limit": limit})
    meta["gallery_roots"] = [str(Path(root).resolve())]
    bank = engine.image_bank(np.array(ds.image_features[:n], dtype=np.float32))
    states = ds.token_features
    sub = TokenFeatures(*_ragged_subset(states, cap))
    with IndexWriter(out, meta, overwrite) as w:
        paths = ds.image_paths[:n] if ds.image_paths is not None else [None] * n
        w.add_images(bank, ds.image_ids[:n], [None if p is None else str(Path(p).resolve()) for p in paths])
        w.add_captions(sub, [ds.captions[j] for j in cap], [int(ds.caption_image[j]) for j in cap])
    return GalleryIndex(out)


def _ragged_subset(tokens: TokenFeatures, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lengths = tokens.lengths[index]
    offsets = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    states = np.empty((int(offsets[-1]), tokens.dim), dtype=np.float16)
    for row, j in enumerate(index):
        states[offsets[row]:offsets[row + 1]] = tokens.states[tokens.offsets[j]:tokens.offsets[j + 1]]
    return states, offsets


def _extract(backbone, paths: list[Path], progress: bool) -> np.ndarray:
    out = np.empty((len(paths), backbone.regions, backbone.dim), dtype=np.float32)
    backbone.extract_files(paths, out, progress=progress)
    return out


def build_from_folder(out: str | Path, checkpoint: str | Path, folder: str | Path,
                      captions: str | Path | None = None, storage: str = "fp16",
                      features: FeatureRequest = FeatureRequest(), overwrite: bool = False,
                      progress: bool = True) -> GalleryIndex:
    """Index every image of a folder (features through the backbone the checkpoint was trained
    with, as in `build_from_dataset`); captions from `captions` (captions.tsv by filename, or
    plain lines) or the folder's captions.tsv."""
    require_index_out(out, overwrite, inputs=(folder, checkpoint) + ((captions,) if captions else ()))
    ckpt = Path(checkpoint)
    model, spec, _ = load_model_and_spec(ckpt)
    options = extraction_options(spec, features)
    folder = Path(folder).resolve()
    paths = list_images(folder)
    if captions is None and (folder / "captions.tsv").is_file():
        captions = folder / "captions.tsv"
    require_images(paths)
    extractor, encoder = options.image_backbone(), options.encoder()
    found = FeatureSpec.from_extractors(extractor, encoder)
    spec.require_match(found, f"checkpoint {ckpt}", f"the backbone and text encoder for {folder}")
    _check_dims(model, extractor.dim, encoder.dim, ckpt)
    engine = ScoringEngine(model, "cpu")
    meta = _meta(ckpt, model, found, storage, {"kind": "folder", "root": str(folder)})
    meta["gallery_roots"] = [str(folder)]
    bank = engine.image_bank(_extract(extractor, paths, progress))
    names = [p.name for p in paths]
    texts, images = _read_captions(captions, names)
    texts, images, tokens = _encode_captions(encoder, texts, images, captions, progress)
    with IndexWriter(out, meta, overwrite) as w:
        w.add_images(bank, names, [str(p) for p in paths])
        if tokens is not None:
            w.add_captions(tokens, texts, images)
    return GalleryIndex(out)


def _unique_images(images: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """The image files named (files, or folders of images), resolved, each file once in the
    order first named (a link to a file already named is left out) -> (files, the resolved
    paths given)."""
    files: list[Path] = []
    roots: list[Path] = []
    for p in images:
        p = Path(p).resolve()
        if p.is_dir():
            files += list_images(p)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"image not found: {p}", "pass existing image files or folders")
        roots.append(p)
    return unique_files(files), roots


def _held_files(paths: Sequence[str | None]) -> set[tuple[int, int]]:
    """The identities of the indexed photos still on disk (a moved or deleted one holds none)."""
    held = set()
    for p in filter(None, paths):
        try:
            held.add(file_identity(Path(p)))
        except OSError:
            continue
    return held


def _select_images(bank: ImageBank, rows: list[int]) -> ImageBank:
    index = torch.as_tensor(rows, dtype=torch.long)
    return ImageBank(**{f: getattr(bank, f)[index] for f in ImageBank.FIELDS})


def _fresh_captions(w: IndexWriter, texts: list[str],
                    image_names: list[str | None]) -> tuple[list[int], list[int | None]]:
    """Which captions the index does not hold yet (each once), read under the write lock ->
    (their positions in `texts`, the image id each names)."""
    by_name = {n: i for i, n in enumerate(w.image_names())}
    have = w.caption_keys()
    keep, ids = [], []
    for j, (text, name) in enumerate(zip(texts, image_names)):
        image = None if name is None else by_name[name]
        key = (text, -1 if image is None else image)
        if key not in have:
            have.add(key)
            keep.append(j)
            ids.append(image)
    return keep, ids


def add_to_index(index: str | Path, images: Sequence[str | Path], checkpoint: str | Path | None = None,
                 captions: str | Path | None = None, progress: bool = True) -> tuple[int, int]:
    """Append images (files, or folders of images) and optional captions to an index without
    rebuilding it -> (images added, captions added). An image (by file, whatever path or link
    names it) or a caption (by text and image) the index already holds is skipped: checked once
    before features are computed, and again under the write lock, so repeated and concurrent
    adds store each once."""
    idx = GalleryIndex(index)
    ckpt = idx.resolve_checkpoint(checkpoint)
    if not idx.has_photos:
        raise DataError(f"index {idx.path} holds precomputed (precomp) features; images cannot be added to it",
                        "build a separate index of your image folder")
    model, _ = load_model(ckpt)
    options = idx.extraction_options()
    backbone, encoder = options.image_backbone(), options.encoder()
    paths, roots = _unique_images(images)
    paths = unique_files(paths, _held_files(idx.image_paths))
    require_images(paths)
    names = list(idx.image_names) + [p.name for p in paths]
    source = Path(captions) if captions else None
    texts, cap_images = _read_captions(source, names)
    texts, cap_images, tokens = _encode_captions(encoder, texts, cap_images, source, progress)
    cap_names = [None if i is None else names[i] for i in cap_images]
    engine = ScoringEngine(model, "cpu")
    bank = engine.image_bank(_extract(backbone, paths, progress)) if paths else None
    with IndexWriter(idx.path) as w:
        w.add_gallery_roots(roots)
        held = _held_files(list(w.image_paths()))
        fresh = [i for i, p in enumerate(paths) if file_identity(p) not in held]
        if fresh:
            w.add_images(_select_images(bank, fresh), [paths[i].name for i in fresh], [str(paths[i]) for i in fresh])
        keep, cap_ids = _fresh_captions(w, texts, cap_names)
        if keep:
            w.add_captions(TokenFeatures(*_ragged_subset(tokens, np.asarray(keep, dtype=np.int64))),
                           [texts[j] for j in keep], cap_ids)
    return len(fresh), len(keep)
