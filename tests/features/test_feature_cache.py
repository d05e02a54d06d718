"""prepare_split and its cache: reuse when nothing changed, rebuild exactly what a change
affects, never trust a half-built entry, never write into the dataset folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mmca.data.dataset import RetrievalDataset
from mmca.errors import DataError, MmcaError
from mmca.features import cache
from mmca.features.backbone import ImageBackbone
from mmca.features.options import FeatureOptions
from mmca.features.prepare import PreparedSplit, open_dataset, prepare_split
from mmca.features.text_encoder import TextEncoder


def _built(prepared: PreparedSplit) -> list[str]:
    return [e.kind for e in prepared.entries if not e.reused]


# The fast extractors: these tests are about the cache, not about the features' quality.
FAST = FeatureOptions(backbone="mobilenet_v2", text_encoder="minilm")


def _prepare(root: Path, cache_dir: Path, features: FeatureOptions = FAST, **kw: object) -> PreparedSplit:
    return prepare_split(root, "dev", features, cache_dir=cache_dir, progress=False, **kw)


def test_features_match_the_models_and_second_call_reuses(
    make_dataset, tmp_path: Path, backbone: ImageBackbone, encoder: TextEncoder, snapshot
) -> None:
    root, store = make_dataset(), tmp_path / "cache"
    before = snapshot(root)
    first = _prepare(root, store)
    assert _built(first) == ["images", "text"]
    data = first.dataset
    assert (data.num_images, data.num_captions) == (10, 50)
    assert data.image_features.shape == (10, 36, 1280) and data.image_features.dtype == np.float16
    images = torch.from_numpy(np.stack([backbone.load_image(p) for p in data.image_paths[:2]])).permute(0, 3, 1, 2)
    np.testing.assert_allclose(data.image_features[:2], backbone.extract_grid(images).numpy(), atol=1e-2, rtol=1e-2)
    alone = encoder.encode([data.captions[7]])
    a, b = data.token_features.offsets[7:9]
    np.testing.assert_allclose(data.token_features.states[a:b], alone.states, atol=2e-2, rtol=1e-2)

    second = _prepare(root, store)
    assert _built(second) == []
    assert [e.manifest["created"] for e in second.entries] == [e.manifest["created"] for e in first.entries]
    assert isinstance(second.dataset.image_features, np.memmap)
    np.testing.assert_array_equal(second.dataset.image_features, data.image_features)
    np.testing.assert_array_equal(second.dataset.token_features.offsets, data.token_features.offsets)
    assert snapshot(root) == before


def test_manifest_records_what_the_features_depend_on(make_dataset, tmp_path: Path) -> None:
    prepared = _prepare(make_dataset(), tmp_path / "cache")
    images, text = (json.loads((e.path / "manifest.json").read_text()) for e in prepared.entries)
    assert images["key"]["backbone"]["grid"] == 6 and images["key"]["backbone"]["image_size"] == 352
    assert len(images["key"]["backbone"]["weights_sha256"]) == 64
    assert images["arrays"]["features.npy"] == {"shape": [10, 36, 1280], "dtype": "float16"}
    assert text["key"]["text_encoder"]["model_type"] == "bert" and text["key"]["text_encoder"]["max_tokens"] == 64
    assert text["counts"]["captions"] == 50 and text["counts"]["truncated"] == 0
    for manifest in (images, text):
        assert manifest["mmca_version"] and manifest["timings"]["build_s"] >= 0


def test_changed_setting_or_input_rebuilds_only_its_side(make_dataset, tmp_path: Path) -> None:
    root, store = make_dataset(), tmp_path / "cache"
    _prepare(root, store)
    assert _built(_prepare(root, store, replace(FAST, grid=7))) == ["images"]
    assert _prepare(root, store, replace(FAST, grid=7)).dataset.image_features.shape[1] == 49
    assert _built(_prepare(root, store, replace(FAST, grid=6))) == []  # both grids stay cached side by side
    assert _built(_prepare(root, store, replace(FAST, max_tokens=12))) == ["text"]

    tsv = root / "captions.tsv"
    lines = tsv.read_text().splitlines()
    name, _, text = lines[3].partition("\t")
    lines[3] = f"{name}\t{text} in the rain"
    tsv.write_text("\n".join(lines) + "\n")
    edited = _prepare(root, store)
    assert _built(edited) == ["text"] and edited.dataset.captions[3].endswith("in the rain")

    image = root / "images" / edited.dataset.image_ids[0]
    os.utime(image, ns=(time.time_ns(), time.time_ns()))
    assert _built(_prepare(root, store)) == []  # identity is the content: a touched photo is the same photo
    image.write_bytes(image.read_bytes() + b"\0")  # bytes after a JPEG's end: other content, same pixels
    assert _built(_prepare(root, store)) == ["images"]
    assert _built(_prepare(root, store, force=True)) == ["images", "text"]


def _same_size(a: Path, b: Path) -> None:
    """Pad the smaller JPEG with bytes after its end marker (decoders ignore them)."""
    size = max(a.stat().st_size, b.stat().st_size)
    for path in (a, b):
        path.write_bytes(path.read_bytes().ljust(size, b"\0"))


def test_swapped_photos_with_their_mtimes_kept_are_re_extracted(make_dataset, tmp_path: Path) -> None:
    root, store = make_dataset(4), tmp_path / "cache"
    ids = (root / "splits" / "dev.txt").read_text().split()
    a, b = root / "images" / ids[0], root / "images" / ids[1]
    _same_size(a, b)
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    before = _prepare(root, store).dataset.image_features
    first, second = np.array(before[0]), np.array(before[1])
    seen = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (a, b)]

    swap = a.with_name("swap")
    os.replace(a, swap)
    os.replace(b, a)
    os.replace(swap, b)
    for path, (_, _, mtime) in zip((a, b), seen):
        os.utime(path, ns=(mtime, mtime))
    # names, sizes, mtimes: all as before
    assert [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (a, b)] == seen

    after = _prepare(root, store)
    assert _built(after) == ["images"]
    np.testing.assert_array_equal(after.dataset.image_features[0], second)
    np.testing.assert_array_equal(after.dataset.image_features[1], first)


def test_a_photo_rewritten_in_place_is_read_again(tmp_path: Path) -> None:
    """Same name, size, mtime and inode, other bytes: the changed ctime makes it read again."""
    folder, store = tmp_path / "photos", tmp_path / "digests.json"
    folder.mkdir()
    photo = folder / "a.jpg"
    photo.write_bytes(b"first")
    mtime = photo.stat().st_mtime_ns
    first = cache.content_fingerprint(folder, ["a.jpg"], store)
    inode = photo.stat().st_ino
    with open(photo, "r+b") as fh:
        fh.write(b"other")
    os.utime(photo, ns=(mtime, mtime))
    assert (photo.stat().st_ino, photo.stat().st_size, photo.stat().st_mtime_ns) == (inode, 5, mtime)
    assert cache.content_fingerprint(folder, ["a.jpg"], store) != first


def test_digests_are_kept_for_settled_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A digest is reused only under the stat it was computed with, and only for a file whose
    last change is older than a clock tick (so a same-tick rewrite cannot keep a stale one)."""
    folder, store = tmp_path / "photos", tmp_path / "digests.json"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"photo")
    cache.content_fingerprint(folder, ["a.jpg"], store)
    assert json.loads(store.read_text())["files"]["a.jpg"][0] is None  # just written: not kept
    monkeypatch.setattr(cache, "RACY_NS", 0)  # (the file is treated as settled; its ctime cannot be aged)
    fingerprint = cache.content_fingerprint(folder, ["a.jpg"], store)
    stat, sha = json.loads(store.read_text())["files"]["a.jpg"]
    assert stat[0] == 5 and sha == cache.file_digest(folder / "a.jpg")
    monkeypatch.setattr(cache, "file_digest", lambda path: pytest.fail(f"{path} was read again"))
    assert cache.content_fingerprint(folder, ["a.jpg"], store) == fingerprint


def test_each_backbone_and_input_size_has_its_own_entry_and_spec(make_dataset, tmp_path: Path) -> None:
    root, store = make_dataset(4), tmp_path / "cache"
    _prepare(root, store)
    lite = _prepare(root, store, replace(FAST, backbone="efficientnet_lite2"))
    assert _built(lite) == ["images"]  # the captions' entry is shared
    spec = lite.dataset.spec.image
    assert (spec.source, spec.image_size, spec.grid, spec.dim) == ("efficientnet_lite2", 352, 6, 1280)
    photos = torch.from_numpy(np.stack([ImageBackbone(6, "efficientnet_lite2").load_image(p)
                                        for p in lite.dataset.image_paths[:2]])).permute(0, 3, 1, 2)
    np.testing.assert_allclose(lite.dataset.image_features[:2],
                               ImageBackbone(6, "efficientnet_lite2").extract_grid(photos).numpy(),
                               atol=1e-2, rtol=1e-2)
    small = _prepare(root, store, replace(FAST, backbone="efficientnet_lite2", image_size=260))
    assert _built(small) == ["images"] and small.dataset.spec.image.image_size == 260
    assert lite.dataset.spec.differences(small.dataset.spec) == ["image image_size: 352 vs 260"]
    for kw in ({}, {"backbone": "efficientnet_lite2"}, {"backbone": "efficientnet_lite2", "image_size": 260}):
        assert _built(_prepare(root, store, replace(FAST, **kw))) == []  # all three stay cached side by side


@pytest.mark.parametrize("damage", ["no manifest", "bad manifest", "short array"])
def test_entry_without_a_valid_manifest_is_rebuilt(make_dataset, tmp_path: Path, damage: str) -> None:
    root, store = make_dataset(), tmp_path / "cache"
    entry = _prepare(root, store).entries[0].path
    if damage == "no manifest":
        (entry / "manifest.json").unlink()
    elif damage == "bad manifest":
        (entry / "manifest.json").write_text("{ not json")
    else:
        np.save(entry / "features.npy", np.zeros((3, 36, 1280), np.float16))
    again = _prepare(root, store)
    assert _built(again) == ["images"]
    assert again.dataset.image_features.shape == (10, 36, 1280)


def test_worker_processes_give_the_same_features(make_dataset, tmp_path: Path) -> None:
    root = make_dataset()
    here = _prepare(root, tmp_path / "here", workers=1).dataset
    sharded = _prepare(root, tmp_path / "sharded", workers=2).dataset
    np.testing.assert_allclose(sharded.image_features, here.image_features, atol=1e-2, rtol=1e-2)
    np.testing.assert_array_equal(sharded.token_features.offsets, here.token_features.offsets)
    np.testing.assert_allclose(sharded.token_features.states, here.token_features.states, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("workers", [1, 2])
def test_failed_build_leaves_nothing(make_dataset, tmp_path: Path, workers: int) -> None:
    """A corrupt image found mid-extraction aborts the build, also from a worker process:
    the error names the file, and neither an entry nor a temporary folder is left."""
    root, store = make_dataset(), tmp_path / "cache"
    victim = root / "images" / (root / "splits" / "dev.txt").read_text().split()[7]
    victim.write_bytes(victim.read_bytes()[:500])
    with pytest.raises(DataError, match=victim.name) as err:
        _prepare(root, store, workers=workers)
    assert "remove it from the split" in (err.value.hint or "")
    assert [p.name for p in store.rglob("*") if p.is_dir() and ".images" in p.name] == []


def test_killed_run_is_not_trusted_and_cleaned_up(make_dataset, tmp_path: Path) -> None:
    """SIGKILL a real prepare as soon as its temporary entry exists; the next run rebuilds."""
    root, store = make_dataset(), tmp_path / "cache"
    code = ("import sys; from mmca.features import prepare_split; "
            "prepare_split(sys.argv[1], 'dev', cache_dir=sys.argv[2], progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), str(store)])
    deadline = time.monotonic() + 60
    while not list(store.glob("*/*.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    leftovers = list(store.glob("*/*.tmp-*"))
    assert leftovers

    again = _prepare(root, store)
    assert "images" in _built(again) and all(not p.exists() for p in leftovers)
    assert again.dataset.image_features.shape == (10, 36, 1280)
    assert not list(store.glob("*/*.tmp-*"))


def test_cache_inside_the_dataset_is_refused(make_dataset) -> None:
    root = make_dataset()
    with pytest.raises(MmcaError, match="inside the dataset folder"):
        _prepare(root, root / "cache")
    assert not (root / "cache").exists()


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MMCA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_cache_dir() == tmp_path / "xdg" / "mmca"
    monkeypatch.setenv("MMCA_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.default_cache_dir() == tmp_path / "mine"


def test_precomp_uses_its_own_image_features(tmp_path: Path, flickr_captions: dict[str, list[str]]) -> None:
    root = tmp_path / "toy_precomp"
    root.mkdir()
    features = np.random.default_rng(0).random((4, 36, 2048), dtype=np.float32)
    np.save(root / "test_ims.npy", features)
    captions = [c for caps in list(flickr_captions.values())[:4] for c in caps]
    (root / "test_caps.txt").write_text("\n".join(captions) + "\n")
    data = open_dataset(root, "test", cache_dir=tmp_path / "cache", progress=False)
    assert isinstance(data, RetrievalDataset)
    np.testing.assert_array_equal(data.image_features, features)
    assert len(data.token_features) == 20
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").glob("*/*")] == ["test.text"]


def test_mirrored_view_is_the_grid_of_the_flipped_photo_and_is_cached(
    make_dataset, tmp_path: Path, backbone: ImageBackbone
) -> None:
    root, store = make_dataset(), tmp_path / "cache"
    first = _prepare(root, store, mirror=True)
    assert _built(first) == ["images", "mirror", "text"]
    data = first.dataset
    (mirrored,) = data.image_views
    assert mirrored.shape == data.image_features.shape
    flipped = np.stack([backbone.load_image(p)[:, ::-1] for p in data.image_paths[:2]])
    photos = torch.from_numpy(flipped).permute(0, 3, 1, 2)
    np.testing.assert_allclose(mirrored[:2], backbone.extract_grid(photos).numpy(), atol=1e-2, rtol=1e-2)
    assert np.abs(mirrored[:2].astype(np.float32) - data.image_features[:2]).mean() > 0.05
    views = data.image_batch([0, 1, 1], views=[1, 0, 1]).numpy()
    np.testing.assert_array_equal(views, np.asarray([mirrored[0], data.image_features[1], mirrored[1]], np.float32))

    assert _built(_prepare(root, store, mirror=True)) == []
    plain = _prepare(root, store)  # the plain entry is shared with mirror=True
    assert _built(plain) == [] and plain.dataset.image_views == ()


def test_precomp_cannot_be_mirrored(tmp_path: Path, flickr_captions: dict[str, list[str]]) -> None:
    root = tmp_path / "toy_precomp"
    root.mkdir()
    np.save(root / "test_ims.npy", np.zeros((1, 36, 2048), np.float32))
    (root / "test_caps.txt").write_text("\n".join(next(iter(flickr_captions.values()))) + "\n")
    with pytest.raises(DataError, match="cannot be mirrored") as err:
        open_dataset(root, "test", cache_dir=tmp_path / "cache", progress=False, mirror=True)
    assert "--mirror-images off" in (err.value.hint or "")
