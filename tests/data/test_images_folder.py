"""Validation of the images-folder layout: every bad input names file, line and remedy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from mmca.data import read_split
from mmca.errors import DataError
from mmca.features.images import list_images

Sample = list[tuple[str, list[str]]]


def _tsv(sample: Sample) -> list[str]:
    return [f"{name}\t{text}" for name, caps in sample for text in caps]


def _folder(make_images_folder, sample: Sample, lines: list[str], split: list[str] | None = None) -> Path:
    names = [name for name, _ in sample]
    split_text = "\n".join(split if split is not None else names) + "\n"
    return make_images_folder("\n".join(lines) + "\n", {"dev": split_text}, names)


def _error(root: Path, split: str = "dev", **kw) -> DataError:
    with pytest.raises(DataError) as err:
        read_split(root, split, **kw)
    return err.value


def test_missing_captions_tsv(make_images_folder, real_sample: Sample) -> None:
    names = [name for name, _ in real_sample]
    err = _error(make_images_folder(None, {"dev": "\n".join(names)}, names))
    assert "captions.tsv not found" in err.message
    assert "filename<TAB>caption" in err.hint and "splits/NAME.txt" in err.hint


def test_line_without_a_tab(make_images_folder, real_sample: Sample) -> None:
    lines = _tsv(real_sample)
    lines[2] = lines[2].replace("\t", " ")
    err = _error(_folder(make_images_folder, real_sample, lines))
    assert "captions.tsv, line 3" in err.message and "filename<TAB>caption" in err.message
    assert "tab" in err.hint


def test_empty_caption(make_images_folder, real_sample: Sample) -> None:
    lines = _tsv(real_sample)
    lines[6] = real_sample[1][0] + "\t   "
    err = _error(_folder(make_images_folder, real_sample, lines))
    assert "captions.tsv, line 7: empty caption" in err.message and real_sample[1][0] in err.message
    assert "delete the line" in err.hint


def test_captions_of_images_outside_the_split_are_ignored(make_images_folder, real_sample: Sample) -> None:
    lines = _tsv(real_sample) + ["not_here.jpg\ta caption for an image that does not exist", ""]
    src = read_split(_folder(make_images_folder, real_sample, lines, split=["", real_sample[0][0], ""]), "dev")
    assert src.image_ids == [real_sample[0][0]] and src.captions == real_sample[0][1]


def test_split_naming_unknown_or_missing_images(make_images_folder, real_sample: Sample) -> None:
    lines = _tsv(real_sample) + ["ghost.jpg\ta caption whose image file is missing"] * 5
    split = [name for name, _ in real_sample[:2]] + ["ghost.jpg", "typo.jpg"]
    err = _error(_folder(make_images_folder, real_sample, lines, split=split))
    assert "splits/dev.txt: 3 problem(s)" in err.message
    assert "line 3: ghost.jpg not found in images/" in err.message
    assert "line 4: typo.jpg not found in images/" in err.message
    assert "line 4: typo.jpg has no caption in captions.tsv" in err.message
    assert "remove those lines" in err.hint


def test_many_problems_are_counted_not_all_listed(make_images_folder, real_sample: Sample) -> None:
    split = [f"missing_{i}.jpg" for i in range(10)]
    err = _error(_folder(make_images_folder, real_sample, _tsv(real_sample), split=split))
    assert "20 problem(s)" in err.message and "... and 15 more" in err.message
    assert err.message.count("\n    line") == 5


def test_duplicate_in_split(make_images_folder, real_sample: Sample) -> None:
    names = [name for name, _ in real_sample]
    err = _error(_folder(make_images_folder, real_sample, _tsv(real_sample), split=names + [names[1]]))
    assert "splits/dev.txt" in err.message
    assert f"line 7: {names[1]} already listed on line 2" in err.message
    assert "once per split" in err.hint


def test_empty_split_file(make_images_folder, real_sample: Sample) -> None:
    err = _error(make_images_folder("\n".join(_tsv(real_sample)), {"dev": "\n\n"}, []))
    assert "lists no images" in err.message


def test_one_image_with_a_wrong_caption_count(make_images_folder, real_sample: Sample) -> None:
    lines = _tsv(real_sample)
    del lines[13]  # third image keeps 4 captions, on lines 11-14
    root = _folder(make_images_folder, real_sample, lines)
    name = real_sample[2][0]
    err = _error(root)
    assert f"captions.tsv: image {name} has 4 captions (lines 11, 12, 13, 14), expected 5" in err.message
    assert "captions_per_image=4" in err.hint and "--captions-per-image 4" in err.hint
    err = _error(root, captions_per_image=None)  # still has to be uniform
    assert f"image {name} has 4 captions (lines 11, 12, 13, 14)" in err.message
    assert "most images" in err.message and "same number of captions" in err.hint


def test_uniform_but_not_five_captions(make_images_folder, real_sample: Sample) -> None:
    three = [(name, caps[:3]) for name, caps in real_sample]
    root = _folder(make_images_folder, real_sample, _tsv(three))
    err = _error(root)
    assert "captions.tsv: every image of split 'dev' has 3 captions, expected 5" in err.message
    assert "captions_per_image=3" in err.hint and "--captions-per-image 3" in err.hint
    for cpi in (None, 3):
        src = read_split(root, "dev", captions_per_image=cpi)
        assert src.captions_per_image == 3 and src.num_captions == 18
        assert src.caption_image.tolist() == [i for i in range(6) for _ in range(3)]


def test_captions_keep_file_order_within_an_image(make_images_folder, real_sample: Sample) -> None:
    lines = _tsv(real_sample)
    lines = lines[5:10] + lines[:5] + lines[10:]  # second image's lines come first in the file
    src = read_split(_folder(make_images_folder, real_sample, lines), "dev")
    assert src.captions[:5] == real_sample[0][1] and src.captions[5:10] == real_sample[1][1]


def test_not_utf8_names_the_line(make_images_folder, real_sample: Sample) -> None:
    root = _folder(make_images_folder, real_sample, _tsv(real_sample))
    data = (root / "captions.tsv").read_bytes().split(b"\n")
    data[3] = data[3] + b" caf\xe9"
    (root / "captions.tsv").write_bytes(b"\n".join(data))
    err = _error(root)
    assert "captions.tsv, line 4: not valid UTF-8" in err.message


def test_a_folder_listing_names_each_file_once(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.jpg")
    (tmp_path / "b-link.jpg").symlink_to(tmp_path / "a.jpg")
    os.link(tmp_path / "a.jpg", tmp_path / "c-hard.jpg")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "d.jpg")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "d.jpg"]
