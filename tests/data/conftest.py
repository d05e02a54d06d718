"""Fixtures for the data-layer tests: the real Flickr8k sample and small datasets built from it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def real_sample(flickr8k: Path) -> list[tuple[str, list[str]]]:
    """The first 6 images of the Flickr8k dev split with their 5 real captions each."""
    names = (flickr8k / "splits" / "dev.txt").read_text(encoding="utf-8").split()[:6]
    captions: dict[str, list[str]] = {name: [] for name in names}
    for line in (flickr8k / "captions.tsv").read_text(encoding="utf-8").splitlines():
        name, _, text = line.partition("\t")
        if name in captions:
            captions[name].append(text)
    return [(name, captions[name]) for name in names]


ImagesFolder = Callable[..., Path]


@pytest.fixture
def make_images_folder(tmp_path: Path, flickr8k: Path) -> ImagesFolder:
    """Write an images-folder dataset from raw file contents; images are real Flickr8k JPEGs."""

    def make(tsv: str | None, splits: dict[str, str], images: list[str], name: str = "imgs") -> Path:
        root = tmp_path / name
        (root / "images").mkdir(parents=True)
        (root / "splits").mkdir()
        for image in images:
            shutil.copy(flickr8k / "images" / image, root / "images" / image)
        if tsv is not None:
            (root / "captions.tsv").write_text(tsv, encoding="utf-8")
        for split, text in splits.items():
            (root / "splits" / f"{split}.txt").write_text(text, encoding="utf-8")
        return root

    return make


@pytest.fixture
def sample_folder(make_images_folder: ImagesFolder, real_sample: list[tuple[str, list[str]]]) -> Path:
    """A valid images-folder dataset: 6 real images, 30 real captions, split 'dev'."""
    tsv = "".join(f"{name}\t{text}\n" for name, caps in real_sample for text in caps)
    names = [name for name, _ in real_sample]
    return make_images_folder(tsv, {"dev": "\n".join(names) + "\n"}, names)


Precomp = Callable[..., Path]


@pytest.fixture
def make_precomp(tmp_path: Path) -> Precomp:
    """Write `{split}_caps.txt` (raw text) and a random `{split}_ims.npy` of `rows` x k x D."""

    def make(
        captions: str,
        rows: int,
        split: str = "test",
        shape: tuple[int, ...] = (4, 8),
        dtype: str = "float32",
        repeat: int = 1,
        name: str = "precomp",
    ) -> Path:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        (root / f"{split}_caps.txt").write_text(captions, encoding="utf-8")
        features = np.random.default_rng(0).standard_normal((rows, *shape)).astype(dtype)
        np.save(root / f"{split}_ims.npy", np.repeat(features, repeat, axis=0))
        return root

    return make
