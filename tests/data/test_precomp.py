"""The precomp layout on the real Flickr30K / MS-COCO caption files, and its validation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mmca.data import layouts, read_split
from mmca.errors import DataError

F30K_TEST = "f30k_precomp/test_caps.txt"  # 5,000 lines, no final newline


def _caps(precomp_captions: Path, rel: str) -> str:
    return (precomp_captions / rel).read_text(encoding="utf-8")


def _error(root: Path, split: str = "test", **kw) -> DataError:
    with pytest.raises(DataError) as err:
        read_split(root, split, **kw)
    return err.value


@pytest.mark.parametrize(
    "rel, images",
    [(F30K_TEST, 1000), ("f30k_precomp/dev_caps.txt", 1014), ("coco_precomp/dev_caps.txt", 1000)],
)
def test_real_caption_files(precomp_captions: Path, tmp_path: Path, rel: str, images: int) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    shutil.copy(precomp_captions / rel, root / "test_caps.txt")
    np.save(root / "test_ims.npy", np.random.default_rng(0).standard_normal((images, 4, 8)).astype(np.float32))
    src = read_split(root, "test")
    lines = _caps(precomp_captions, rel).splitlines()
    assert (src.num_images, src.num_captions, src.captions_per_image) == (images, 5 * images, 5)
    assert src.captions[0] == lines[0].strip() and src.captions[-1] == lines[-1].strip()
    assert np.array_equal(src.caption_image, np.repeat(np.arange(images), 5))
    assert src.image_ids[:3] == ["0", "1", "2"] and src.image_paths is None
    assert isinstance(src.image_features, np.memmap) and src.image_features.shape == (images, 4, 8)


def test_f30k_test_file_lacks_a_final_newline(precomp_captions: Path) -> None:
    assert not (precomp_captions / F30K_TEST).read_bytes().endswith(b"\n")


def test_trailing_blank_line_and_float16(make_precomp) -> None:
    src = read_split(make_precomp("a dog .\n" * 10 + "\n", rows=2, dtype="float16"), "test")
    assert src.num_captions == 10 and src.image_features.dtype == np.float16


def test_im_div_rows_are_deduplicated_without_copy(precomp_captions: Path, make_precomp) -> None:
    root = make_precomp(_caps(precomp_captions, F30K_TEST), rows=1000, repeat=5)
    full = np.load(root / "test_ims.npy")
    for cpi in (5, None):
        src = read_split(root, "test", captions_per_image=cpi)
        assert (src.num_images, src.num_captions, src.captions_per_image) == (1000, 5000, 5)
        assert np.array_equal(src.image_features, full[::5])
        assert isinstance(src.image_features, np.memmap) and not src.image_features.flags.owndata
        assert src.image_features.strides[0] == 5 * full[0].nbytes


def test_one_row_per_caption_without_repeats_is_one_caption_per_image(make_precomp) -> None:
    root = make_precomp("a dog .\n" * 10, rows=10)
    err = _error(root)
    assert "10 captions for the 10 images of test_ims.npy, 10 x 5 = 50 expected" in err.message
    assert "captions_per_image=1" in err.hint
    assert read_split(root, "test", captions_per_image=None).captions_per_image == 1


def test_ids_one_per_image_or_per_caption(make_precomp) -> None:
    root = make_precomp("a dog .\n" * 10, rows=2)
    (root / "test_ids.txt").write_text("391895\n522418\n")
    assert read_split(root, "test").image_ids == ["391895", "522418"]
    (root / "test_ids.txt").write_text("7\n" * 5 + "9\n" * 5)
    assert read_split(root, "test").image_ids == ["7", "9"]


def test_bad_ids(make_precomp) -> None:
    root = make_precomp("a dog .\n" * 10, rows=2)
    (root / "test_ids.txt").write_text("1\n2\n3\n")
    err = _error(root)
    assert "test_ids.txt: 3 ids, expected one per image (2) or one per caption (10)" in err.message
    (root / "test_ids.txt").write_text("7\n" * 4 + "8\n" + "9\n" * 5)
    err = _error(root)
    assert "test_ids.txt, line 5: id '8' differs from '7' on line 1" in err.message


def test_features_of_wrong_ndim(make_precomp) -> None:
    root = make_precomp("a dog .\n" * 10, rows=2, shape=(8,))
    err = _error(root)
    assert "test_ims.npy: features have shape (2, 8) (2-D), expected N x k x D_img" in err.message
    assert "(N, 1, D_img)" in err.hint


def test_integer_features(make_precomp) -> None:
    err = _error(make_precomp("a dog .\n" * 10, rows=2, dtype="int32"))
    assert "test_ims.npy: dtype int32, expected a float type" in err.message


def test_caption_count_mismatch(precomp_captions: Path, make_precomp) -> None:
    err = _error(make_precomp(_caps(precomp_captions, F30K_TEST), rows=999))
    assert "test_caps.txt: 5000 captions for the 999 images of test_ims.npy" in err.message
    assert "999 x 5 = 4995 expected" in err.message and "same split" in err.hint
    err = _error(make_precomp(_caps(precomp_captions, F30K_TEST), rows=999, name="again"), captions_per_image=None)
    assert "5000 captions for the 999 images" in err.message


def test_two_captions_per_image(make_precomp) -> None:
    root = make_precomp("a dog .\n" * 6, rows=3)
    err = _error(root)
    assert "6 captions for the 3 images" in err.message and "3 x 5 = 15 expected" in err.message
    assert "captions_per_image=2" in err.hint and "--captions-per-image 2" in err.hint
    for cpi in (None, 2):
        src = read_split(root, "test", captions_per_image=cpi)
        assert src.captions_per_image == 2 and src.caption_image.tolist() == [0, 0, 1, 1, 2, 2]


def test_empty_caption_line(make_precomp) -> None:
    err = _error(make_precomp("a dog .\n" * 3 + "  \n" + "a cat .\n" * 6, rows=2))
    assert "test_caps.txt, line 4: empty caption" in err.message


def test_missing_features_file(make_precomp) -> None:
    root = make_precomp("a dog .\n" * 5, rows=1)
    (root / "test_ims.npy").unlink()
    err = _error(root)
    assert "test_ims.npy not found" in err.message and "test_caps.txt" in err.hint


@pytest.mark.parametrize("bad, kind", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_features(make_precomp, monkeypatch, bad: float, kind: str) -> None:
    monkeypatch.setattr(layouts, "_CHUNK_BYTES", 3 * 4 * 8 * 4)  # 3 images per chunk
    root = make_precomp("a dog .\n" * 50, rows=10)
    features = np.load(root / "test_ims.npy")
    features[7, 2, 5] = bad
    np.save(root / "test_ims.npy", features)
    err = _error(root)
    assert f"test_ims.npy: image 7 has {kind} values" in err.message


def test_non_finite_features_with_im_div(make_precomp) -> None:
    root = make_precomp("a dog .\n" * 20, rows=4, repeat=5)
    features = np.load(root / "test_ims.npy")
    features[10:15, 0, 0] = np.nan
    np.save(root / "test_ims.npy", features)
    err = _error(root)
    assert "test_ims.npy: image 2 (row 10) has NaN values" in err.message
