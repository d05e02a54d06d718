"""Layout detection, split listing, and the two layouts read on real files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mmca.data import SplitSource, detect_layout, list_splits, read_split
from mmca.errors import DataError


def test_flickr8k_sample_reads(flickr8k: Path) -> None:
    assert detect_layout(flickr8k) == "images"
    assert list_splits(flickr8k) == ["dev", "train"]
    for split, images in [("dev", 1000), ("train", 6091)]:
        src = read_split(flickr8k, split)
        assert (src.num_images, src.num_captions, src.captions_per_image) == (images, 5 * images, 5)
        assert src.caption_image.dtype == np.int64
        assert np.array_equal(src.caption_image, np.repeat(np.arange(images), 5))
        assert src.image_features is None and src.image_paths is not None
        assert all(p.is_absolute() for p in src.image_paths)
        assert src.image_paths[0].is_file() and src.image_paths[-1].is_file()
        names = (flickr8k / "splits" / f"{split}.txt").read_text(encoding="utf-8").split()
        assert src.image_ids == names
        assert [p.name for p in src.image_paths] == names


def test_flickr8k_first_dev_caption_is_the_tsv_line(flickr8k: Path) -> None:
    src = read_split(flickr8k, "dev")
    first = next(
        line for line in (flickr8k / "captions.tsv").read_text(encoding="utf-8").splitlines()
        if line.startswith(src.image_ids[0] + "\t")
    )
    assert f"{src.image_ids[0]}\t{src.captions[0]}" == first


def test_both_layouts_give_the_same_content(
    sample_folder: Path, make_precomp, real_sample: list[tuple[str, list[str]]]
) -> None:
    captions = [text for _, caps in real_sample for text in caps]
    precomp = make_precomp("\n".join(captions) + "\n", rows=len(real_sample), split="dev")
    a, b = read_split(sample_folder, "dev"), read_split(precomp, "dev")
    assert (detect_layout(sample_folder), detect_layout(precomp)) == ("images", "precomp")
    assert a.num_images == b.num_images == 6
    assert a.captions == b.captions == captions
    assert np.array_equal(a.caption_image, b.caption_image)
    assert a.captions_per_image == b.captions_per_image == 5
    assert b.image_paths is None and b.image_features is not None and b.image_features.shape == (6, 4, 8)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in [root, *root.rglob("*")]
    }


def test_reading_writes_nothing_into_the_dataset(sample_folder: Path, make_precomp) -> None:
    precomp = make_precomp("a dog .\n" * 5, rows=1)
    for root in (sample_folder, precomp):
        before = _snapshot(root)
        list_splits(root)
        src = read_split(root, list_splits(root)[0])
        assert isinstance(src, SplitSource)
        assert _snapshot(root) == before


def test_neither_layout_says_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as err:
        detect_layout(tmp_path)
    text = str(err.value)
    assert str(tmp_path) in text and "captions.tsv" in text and "_ims.npy" in text and "_caps.txt" in text


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_split(tmp_path / "nope", "dev")


def test_both_layouts_in_one_folder_is_ambiguous(sample_folder: Path) -> None:
    (sample_folder / "dev_caps.txt").write_text("a dog .\n")
    with pytest.raises(DataError, match="both layouts"):
        detect_layout(sample_folder)


@pytest.mark.parametrize("layout", ["images", "precomp"])
def test_unknown_split_lists_the_available_ones(layout: str, sample_folder: Path, make_precomp) -> None:
    root = sample_folder if layout == "images" else make_precomp("a dog .\n" * 5, rows=1, split="dev")
    with pytest.raises(DataError) as err:
        read_split(root, "test")
    assert "'test' not found" in err.value.message and "available: dev" in err.value.message
    expected = "splits/test.txt" if layout == "images" else "test_caps.txt"
    assert expected in err.value.hint


def test_invalid_captions_per_image_argument(sample_folder: Path) -> None:
    with pytest.raises(ValueError):
        read_split(sample_folder, "dev", captions_per_image=0)


def test_nothing_in_shared_data_is_writable_by_accident(flickr8k: Path) -> None:
    """Reading the real sample leaves its listing untouched (no cache or lock files appear)."""
    before = sorted(os.listdir(flickr8k)), sorted(os.listdir(flickr8k / "splits"))
    read_split(flickr8k, "dev")
    assert (sorted(os.listdir(flickr8k)), sorted(os.listdir(flickr8k / "splits"))) == before
