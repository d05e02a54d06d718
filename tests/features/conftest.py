"""Fixtures for the feature tests: real Flickr8k photos and captions, the real frozen models
(loaded once per test run), and small images-folder datasets copied into tmp."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from mmca.features.backbone import ImageBackbone
from mmca.features.text_encoder import TextEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses; see one_torch_thread


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for these tiny inputs. On a shared 2-core machine, threads that wait
    for each other at every layer cost 3x the CPU time and wall time (measured: the suite ran
    45 s instead of 155 s beside other jobs); the features are the same either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def flickr_captions(flickr8k: Path) -> dict[str, list[str]]:
    """Every Flickr8k caption, by image filename, in file order."""
    captions: dict[str, list[str]] = {}
    for line in (flickr8k / "captions.tsv").read_text(encoding="utf-8").splitlines():
        name, _, text = line.partition("\t")
        captions.setdefault(name, []).append(text)
    return captions


@pytest.fixture(scope="session")
def backbone() -> ImageBackbone:
    return ImageBackbone(grid=6, name="mobilenet_v2")  # the fast extractors: these tests are about behaviour


@pytest.fixture(scope="session")
def encoder() -> TextEncoder:
    return TextEncoder("minilm")


MakeDataset = Callable[..., Path]


@pytest.fixture
def make_dataset(tmp_path: Path, flickr8k: Path, flickr_captions: dict[str, list[str]]) -> MakeDataset:
    """An images-folder dataset of the first `n` dev images (real JPEGs, 5 real captions each)."""

    def make(n: int = 10, name: str = "tiny", split: str = "dev") -> Path:
        root = tmp_path / name
        (root / "images").mkdir(parents=True)
        (root / "splits").mkdir()
        names = (flickr8k / "splits" / "dev.txt").read_text(encoding="utf-8").split()[:n]
        for image in names:
            shutil.copy2(flickr8k / "images" / image, root / "images" / image)
        lines = [f"{image}\t{text}" for image in names for text in flickr_captions[image]]
        (root / "captions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
        return root

    return make


Snapshot = Callable[[Path], dict[str, tuple[int, int]]]


@pytest.fixture(scope="session")
def snapshot() -> Snapshot:
    """Every path under a folder with its size and mtime: proof that nothing was written there."""

    def take(root: Path) -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}

    return take
