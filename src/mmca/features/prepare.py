"""Prepare a split: read it, compute the frozen features it lacks, cache them, and return the
`RetrievalDataset` every job reads (docs/model.md: both frozen parts are computed once per dataset).

Each split has two cache entries, so changing one side never recomputes the other:
`{split}.images-{hash}` (the backbone's grid; images layout only, precomp ships its features) and
`{split}.text-{hash}` (token states); a training split may add `{split}.mirror-{hash}`, the
grid of every photo flipped left to right (a second view for training). The hash covers the
dataset root, the split and the settings; the manifest also pins the model weights and a
fingerprint of the inputs, and an entry whose manifest does not match is rebuilt in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import mmca.features.cache as cache
import mmca.features.parallel as parallel
from mmca.data.dataset import RetrievalDataset, SplitSource, TokenFeatures
from mmca.data.layouts import read_split
from mmca.data.spec import FeatureSpec, precomp_image_spec, text_spec
from mmca.errors import DataError
from mmca.features.backbone import ImageBackbone
from mmca.features.options import FeatureOptions
from mmca.features.precision import FP32
from mmca.features.text_encoder import TextEncoder

# Items each worker process must get to repay its start-up of a few seconds (parallel.py).
IMAGES_PER_WORKER = 500
CAPTIONS_PER_WORKER = 2500
DIGESTS = "image-digests.json"  # per split: the sha256 of each photo, read once (cache.content_fingerprint)


@dataclass
class EntryReport:
    """What happened to one cache entry: reused as is, or built now."""

    kind: str  # "images", "mirror" or "text"
    path: Path
    reused: bool
    seconds: float
    manifest: dict[str, Any]


@dataclass
class PreparedSplit:
    dataset: RetrievalDataset
    entries: list[EntryReport]
    seconds: float

    @property
    def reused(self) -> bool:
        return all(e.reused for e in self.entries)


def prepare_split(
    root: str | Path,
    split: str,
    features: FeatureOptions = FeatureOptions(),
    *,
    cache_dir: str | Path | None = None,
    captions_per_image: int | None = 5,
    progress: bool = True,
    force: bool = False,
    workers: int | None = None,
    mirror: bool = False,
    source: SplitSource | None = None,
) -> PreparedSplit:
    """Load the split's cached features, building (or with `force`, rebuilding) what is missing.

    `features`: the extractors and their settings (`mmca.features.options`).
    Writes only under `cache_dir` (default: `cache.default_cache_dir()`), never into `root`.
    `workers`: processes for building (default: one per CPU for large splits, see parallel.py).
    `mirror`: also the mirrored photos' grids, as `dataset.image_views` (images layout only).
    `source`: the split as already read by `read_split` (so a caller that checked it first
    does not read, and scan, its files twice).
    """
    started = time.perf_counter()
    if source is None:
        source = read_split(Path(root), split, captions_per_image)
    folder = cache.dataset_dir(Path(cache_dir) if cache_dir is not None else cache.default_cache_dir(), source.root)
    build = _Build(progress, force, workers)
    entries = []
    views: tuple[np.ndarray, ...] = ()
    encoder = features.encoder()  # first: a bad encoder is refused before any image is computed
    if source.image_features is None:
        extractor = features.image_backbone()
        entry, regions = _image_entry(source, folder, extractor, build)
        entries.append(entry)
        if mirror:
            entry, mirrored = _image_entry(source, folder, extractor, build, mirror=True)
            entries.append(entry)
            views = (mirrored,)
        image_spec = None
    elif mirror:
        raise DataError(
            f"{source.root} ships precomputed features: its photos cannot be mirrored",
            "train without mirrored views (--mirror-images off)",
        )
    else:
        regions = source.image_features
        image_spec = precomp_image_spec(source.root / f"{split}_ims.npy", regions.shape, regions.dtype)
    entry, tokens = _text_entry(source, folder, encoder, build)
    entries.append(entry)
    if image_spec is None:
        spec = FeatureSpec.from_extractors(extractor, encoder, mirror_images=mirror)
    else:
        spec = FeatureSpec(image_spec, text_spec(encoder))
    dataset = RetrievalDataset(
        name=source.root.name,
        split=split,
        image_ids=source.image_ids,
        captions=source.captions,
        caption_image=source.caption_image,
        captions_per_image=source.captions_per_image,
        image_features=regions,
        token_features=tokens,
        image_paths=source.image_paths,
        image_views=views,
        feature_spec=spec,
        root=source.root,
    )
    return PreparedSplit(dataset, entries, time.perf_counter() - started)


def open_dataset(root: str | Path, split: str, features: FeatureOptions = FeatureOptions(), *,
                 cache_dir: str | Path | None = None, captions_per_image: int | None = 5, progress: bool = True,
                 workers: int | None = None, mirror: bool = False,
                 source: SplitSource | None = None) -> RetrievalDataset:
    """The public entry: a split with its frozen features, from the cache when it is valid
    (`prepare_split`'s dataset; its keywords but `force`)."""
    return prepare_split(root, split, features, cache_dir=cache_dir, captions_per_image=captions_per_image,
                         progress=progress, workers=workers, mirror=mirror, source=source).dataset


@dataclass(frozen=True)
class _Build:
    """How to build an entry: with progress bars, ignoring a valid entry, with this many workers."""

    progress: bool
    force: bool
    workers: int | None

    def run(self, task: parallel.ShardTask, total: int, min_per_worker: int, desc: str, unit: str) -> None:
        """task(0, total, ...) here, or sharded over worker processes when that pays off."""
        workers = parallel.plan_workers(total, min_per_worker, self.workers)
        with tqdm(total=total, desc=desc, unit=unit, disable=not self.progress) as bar:
            if workers == 1:
                task(0, total, bar.update)
            else:
                parallel.run_sharded(task, total, workers, bar.update)


def _entry(
    folder: Path, source: SplitSource, kind: str, settings: dict[str, Any], key: dict[str, Any], build: _Build
) -> tuple[Path, dict[str, Any] | None]:
    """The entry's path, and its manifest when it can be reused."""
    path = folder / f"{source.split}.{kind}-{cache.digest([str(source.root), source.split, kind, settings])[:12]}"
    return path, None if build.force else cache.load_manifest(path, key)


def _image_entry(
    source: SplitSource, folder: Path, backbone: ImageBackbone, build: _Build, mirror: bool = False
) -> tuple[EntryReport, np.ndarray]:
    started = time.perf_counter()
    assert source.image_paths is not None
    kind = "mirror" if mirror else "images"
    settings: dict[str, Any] = {"backbone": backbone.name, "grid": backbone.grid}
    if backbone.image_size != backbone.entry.image_size:  # (so default-size entries keep their names)
        settings["image_size"] = backbone.image_size
    if backbone.precision != FP32:  # another feature set: its own entry, beside the fp32 one
        settings["precision"] = backbone.precision
    key = {
        "backbone": backbone.describe(),
        "split": source.split,
        "images": cache.content_fingerprint(
            source.root / "images", source.image_ids, folder / f"{source.split}.{DIGESTS}", recheck=build.force
        ),
    }
    path, manifest = _entry(folder, source, kind, settings, key, build)
    reused = manifest is not None
    if manifest is None:
        manifest = {"key": key, "root": str(source.root), "counts": {"images": source.num_images}}
        with cache.build_entry(path, manifest) as tmp:
            shape = (source.num_images, backbone.regions, backbone.dim)
            out = cache.allocate_array(tmp, "features.npy", shape)
            task = partial(_extract_shard, source.image_paths, out, backbone.options(), mirror)
            desc = "extract mirrored images" if mirror else "extract images"
            build.run(task, source.num_images, IMAGES_PER_WORKER, desc, "img")
    report = EntryReport(kind, path, reused, time.perf_counter() - started, manifest)
    return report, cache.open_array(path, "features.npy")


def _text_entry(
    source: SplitSource, folder: Path, encoder: TextEncoder, build: _Build
) -> tuple[EntryReport, TokenFeatures]:
    started = time.perf_counter()
    settings: dict[str, Any] = {"text_encoder": str(encoder.model_dir), "max_tokens": encoder.max_tokens}
    if encoder.precision != FP32:
        settings["precision"] = encoder.precision
    key = {
        "text_encoder": encoder.describe(),
        "split": source.split,
        "captions": cache.digest([source.captions, source.caption_image.tolist()]),
    }
    path, manifest = _entry(folder, source, "text", settings, key, build)
    reused = manifest is not None
    if manifest is None:
        manifest = {"key": key, "root": str(source.root)}
        with cache.build_entry(path, manifest) as tmp:
            ids, truncated = encoder.tokenize(source.captions)
            lengths = np.array([len(x) for x in ids], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            np.save(tmp / "offsets.npy", offsets)
            out = cache.allocate_array(tmp, "states.npy", (int(offsets[-1]), encoder.dim))
            task = partial(_encode_shard, ids, offsets, out, encoder.model_dir, encoder.max_tokens, encoder.precision)
            build.run(task, source.num_captions, CAPTIONS_PER_WORKER, "encode captions", "cap")
            manifest["counts"] = {
                "captions": source.num_captions,
                "tokens": int(offsets[-1]),
                "tokens_mean": round(float(lengths.mean()), 2),
                "tokens_max": int(lengths.max()),
                "truncated": truncated,
            }
    report = EntryReport("text", path, reused, time.perf_counter() - started, manifest)
    tokens = TokenFeatures(cache.open_array(path, "states.npy"), np.load(path / "offsets.npy"))
    return report, tokens


# Shard tasks (module-level so worker processes can unpickle them): each fills its rows of
# the .npy file in place, so shards never pass features through the parent.


def _extract_shard(
    paths: list[Path],
    out_path: Path,
    backbone: dict[str, Any],
    mirror: bool,
    start: int,
    stop: int,
    report: Callable[[int], None],
) -> None:
    out = np.load(out_path, mmap_mode="r+")
    ImageBackbone(**backbone).extract_files(paths[start:stop], out[start:stop], report=report, mirror=mirror)
    out.flush()


def _encode_shard(
    ids: list[list[int]],
    offsets: np.ndarray,
    states_path: Path,
    model_dir: Path,
    max_tokens: int,
    precision: str,
    start: int,
    stop: int,
    report: Callable[[int], None],
) -> None:
    states = np.load(states_path, mmap_mode="r+")
    encoder = TextEncoder(model_dir, max_tokens, precision)
    encoder.encode_ids(ids[start:stop], out=states[offsets[start] : offsets[stop]], report=report)
    states.flush()
