"""Train and dev splits that share images warn at the start of a run, naming how many: dev
recalls of images the model trained on measure memory, not retrieval."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest

from mmca.data.identity import shared_images
from mmca.train import Trainer
from test_train import QUICK, synthetic_split


def photos(split, folder: Path, names: list[str]):
    """The toy split as one of the images-folder layout: its images are these photo files."""
    return dataclasses.replace(split, image_ids=names, image_paths=[folder / n for n in names])


def test_a_run_on_splits_that_share_images_warns_how_many(tmp_path):
    folder = tmp_path / "images"
    train = photos(synthetic_split(4, 1), folder, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    dev = photos(synthetic_split(4, 2), folder / "sub" / "..", ["c.jpg", "d.jpg", "e.jpg", "f.jpg"])  # resolved
    with pytest.warns(UserWarning, match=r"the s1 and s2 splits share 2 image\(s\) \(of 4 and 4\)"):
        Trainer(QUICK["config"], train, dev, tmp_path / "run", progress=False, log=lambda _: None)


def test_disjoint_splits_and_row_numbers_do_not_warn(tmp_path):
    folder = tmp_path / "images"
    train = photos(synthetic_split(4, 1), folder, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    dev = photos(synthetic_split(4, 2), folder, ["e.jpg", "f.jpg", "g.jpg", "h.jpg"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(QUICK["config"], train, dev, tmp_path / "run", progress=False, log=lambda _: None)
    # precomp splits without ids files: ids "0", "1", ... are row numbers, not shared images
    assert shared_images(synthetic_split(4, 1), synthetic_split(4, 2)) == 0


def test_precomp_ids_are_compared():
    train = dataclasses.replace(synthetic_split(4, 1), image_ids=["10", "11", "12", "13"])
    dev = dataclasses.replace(synthetic_split(4, 2), image_ids=["13", "14", "15", "16"])
    assert shared_images(train, dev) == 1
