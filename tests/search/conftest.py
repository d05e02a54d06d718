"""Fixtures for the search tests: an index of the test run's ~20 real Flickr8k photos with their
captions and its small random-weight checkpoint (tests/conftest.py), built once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def index_dir(gallery: Path, checkpoint: Path, tmp_path_factory) -> Path:
    from mmca.search import build_from_folder
    out = tmp_path_factory.mktemp("indexes") / "gallery"
    build_from_folder(out, checkpoint, gallery, progress=False)
    return out


@pytest.fixture(scope="session")
def searcher(index_dir: Path):
    from mmca.search import Searcher
    return Searcher(index_dir)
