"""The API refuses what is not input with an MmcaError that says what to do, never a raw
traceback: sentences with no visible characters or lone surrogates, region arrays that are
not real numbers, raw bytes, a device that does not exist, a PIL image of a truncated JPEG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmca
from mmca.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def retriever(checkpoint):
    return mmca.load(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def truncated_jpeg(gallery, tmp_path_factory) -> Path:
    """The first half of a real photo's bytes: the header reads, the pixels do not."""
    photo = sorted(gallery.glob("*.jpg"))[0].read_bytes()
    path = tmp_path_factory.mktemp("truncated") / "half.jpg"
    path.write_bytes(photo[:len(photo) // 2])
    return path


@pytest.mark.parametrize("texts, message", [
    (["\x00"], "sentence 0 has no visible characters"),
    (["a dog", "\u200b\u200c\u200d"], "sentence 1 has no visible characters"),  # zero-width only
    (["\u2060\ufeff", "a dog", "\x00 \x01"], "sentences 0, 2 have no visible"),
    (["dog \ud800"], "sentence 0 is not valid Unicode text"),  # a lone surrogate
])
def test_sentences_that_are_not_text_are_refused(retriever, texts, message):
    with pytest.raises(DataError, match=message):
        retriever.encode_texts(texts)


def test_a_sentence_with_a_stray_control_character_is_still_a_sentence(retriever):
    assert retriever.encode_texts(["a dog\x00 runs"]).ids[0] == retriever.encode_texts(["a dog runs"]).ids[0]


@pytest.mark.parametrize("regions", [
    np.zeros((1, 36, 1280), np.complex64),  # a cast to float would drop the imaginary part
    np.full((1, 36, 1280), 0.5, dtype=object),
    torch.zeros(1, 36, 1280, dtype=torch.complex64),
    torch.zeros(1, 36, 1280, dtype=torch.bool),
], ids=["numpy complex", "numpy object", "torch complex", "torch bool"])
def test_region_arrays_of_other_than_real_numbers_are_refused(retriever, regions):
    with pytest.raises(DataError, match="real numbers expected"):
        retriever.encode_images(regions)


@pytest.mark.parametrize("data", [b"\xff\xd8\xff\xe0", bytearray(b"GIF89a"), memoryview(b"\x89PNG")])
def test_raw_bytes_are_refused_with_what_to_pass_instead(retriever, data):
    with pytest.raises(DataError, match="(?s)raw bytes.*PIL.Image.open"):
        retriever.encode_images(data)


def test_integer_regions_are_numbers(retriever):
    assert len(retriever.encode_images(np.zeros((2, 36, 1280), np.int32))) == 2


@pytest.mark.parametrize("device, message", [
    ("banana", "'banana' is not a device PyTorch knows"),
    (7.5, "is not a device PyTorch knows"),
    ("cuda:99", "cuda:99"),  # no CUDA here, or no 100th GPU where there is
    ("meta", "holds no data"),
])
def test_a_device_that_does_not_exist_is_a_clean_error(checkpoint, device, message):
    with pytest.raises(ConfigError, match=message):
        mmca.load(checkpoint, device=device)


def test_a_pil_image_of_a_truncated_jpeg_is_a_clean_error(retriever, truncated_jpeg, gallery):
    whole = Image.open(sorted(gallery.glob("*.jpg"))[0])
    with Image.open(truncated_jpeg) as im:
        with pytest.raises(DataError, match="image 1 \\(a PIL image\\) cannot be decoded"):
            retriever.encode_images([whole, im])
    with pytest.raises(DataError, match="half.jpg"):  # the file itself: named
        retriever.encode_images([truncated_jpeg])
