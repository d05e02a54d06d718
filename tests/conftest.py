"""Fixtures shared by every test folder: where the read-only sample data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("MMCA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """A path under the shared data folder; the test skips (saying why) if it is not there."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared sample data not found at {path} (set MMCA_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    return shared_path("flickr8k")


@pytest.fixture(scope="session")
def precomp_captions() -> Path:
    return shared_path("precomp-captions")
