"""Property-based tests (hypothesis) of the readers of untrusted files: the dataset readers and
the checkpoint loader (the server's endpoints: tests/search/test_server_fuzz.py). Whatever the input, the answer is
a valid result or a clear error (MmcaError / a 4xx JSON), never a traceback or a 500, and the
readers write nothing. Example counts are fixed so CI stays fast."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmca.data.layouts import read_split
from mmca.errors import MmcaError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
names = st.sampled_from(["a.jpg", "b.jpg", "c.jpg", "missing.jpg", "../a.jpg", "", " a.jpg"])


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def read_or_refuse(root: Path, cpi):
    """The split, or None after a clear refusal; either way nothing under root was written."""
    before = snapshot(root)
    try:
        source = read_split(root, "dev", captions_per_image=cpi)
    except MmcaError:
        source = None
    else:
        assert len(source.captions) == len(source.caption_image) == source.num_images * source.captions_per_image
    assert snapshot(root) == before
    return source


def images_dataset(root: Path, tsv: bytes, split: bytes) -> Path:
    (root / "images").mkdir()
    (root / "splits").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (20, 20)).save(root / "images" / name, "JPEG")
    (root / "captions.tsv").write_bytes(tsv)
    (root / "splits" / "dev.txt").write_bytes(split)
    return root


tsv_lines = st.lists(st.tuples(names, st.sampled_from(["\t", " ", "\t\t", ""]), text), max_size=12)


@FAST
@given(tsv_lines, st.lists(names, max_size=5), st.sampled_from(["utf-8", "utf-8-sig", "latin-1"]),
       st.sampled_from([None, 1, 5]))
def test_images_folder_reader(lines, split_names, encoding, cpi):
    tsv = "\n".join(f"{n}{sep}{t}" for n, sep, t in lines).encode(encoding, errors="replace")
    split = "\n".join(split_names).encode()
    with tempfile.TemporaryDirectory() as tmp:
        root = images_dataset(Path(tmp), tsv, split)
        source = read_or_refuse(root, cpi)
        if source is not None:
            assert all(p.is_file() for p in source.image_paths)


arrays = st.one_of(
    st.tuples(st.integers(0, 4), st.integers(1, 3), st.integers(1, 4)).map(lambda s: np.zeros(s, np.float32)),
    st.integers(1, 4).map(lambda n: np.full((n, 2, 3), np.nan, np.float16)),
    st.integers(1, 4).map(lambda n: np.ones((n, 6), np.float32)),
    st.integers(1, 4).map(lambda n: np.ones((n, 2, 3), np.int64)),
    st.just(np.array([{"x": 1}], dtype=object)),
)


@FAST
@given(arrays, st.lists(text, max_size=12), st.sampled_from([None, 1, 5]), st.booleans())
def test_precomp_reader(features, captions, cpi, garbage):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if garbage:
            (root / "dev_ims.npy").write_bytes(b"not an array at all")
        else:
            np.save(root / "dev_ims.npy", features, allow_pickle=True)
        (root / "dev_caps.txt").write_text("\n".join(captions), encoding="utf-8")
        source = read_or_refuse(root, cpi)
        if source is not None:
            assert np.isfinite(np.asarray(source.image_features, dtype=np.float64)).all()


leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True), text,
                 st.builds(torch.zeros, st.integers(0, 4)))
payloads = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(text, inner, max_size=4)), max_leaves=12)


@FAST
@given(payloads, st.dictionaries(st.sampled_from(["img_dim", "txt_dim", "d", "heads", "alpha", "windows",
                                                  "dropout", "text_norm", "ffn_dim"]), leaf, max_size=5),
       st.booleans())
def test_checkpoint_loader(extra, config, with_format):
    from mmca.checkpoint import FORMAT, load_model_and_spec

    payload = {"config": config, "model": extra, "feature_spec": extra}
    if with_format:
        payload["format"] = FORMAT
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.pt"
        torch.save(payload, path)
        with pytest.raises(MmcaError):  # none of these is a complete, consistent checkpoint
            load_model_and_spec(path)
        path.write_bytes(json.dumps(extra, default=str).encode()[:200])
        with pytest.raises(MmcaError):
            load_model_and_spec(path)
