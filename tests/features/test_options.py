"""The typed feature options: one frozen value with its defaults in one place, what a user asked
for resolved to it (flags and keywords alike), and the extractors it names."""

from __future__ import annotations

import dataclasses

import pytest

from mmca.cli import build_parser
from mmca.cli.features import feature_options, feature_request
from mmca.features import FeatureOptions, FeatureRequest, ImageBackbone, TextEncoder
from mmca.features.precision import resolve_extract_precision


def test_the_defaults_are_those_of_the_extractors():
    options = FeatureOptions()
    assert (options.backbone, options.image_size, options.grid, options.max_tokens) == \
        ("efficientnet_lite2", None, 6, 64)
    assert (options.precision.image, options.precision.text) == ("fp32", "fp32")
    assert FeatureRequest().options() == options  # nothing asked: the defaults
    # the extractors' own defaults are the same constants
    assert ImageBackbone.__init__.__defaults__[:2] == (options.grid, options.backbone)
    assert TextEncoder.__init__.__defaults__[:2] == (options.text_encoder, options.max_tokens)


def test_a_request_keeps_what_was_asked_and_resolves_the_precision():
    asked = FeatureRequest(backbone="efficientnet_lite2", grid=7, max_tokens=32, precision="bf16").options()
    assert asked == FeatureOptions(backbone="efficientnet_lite2", grid=7, max_tokens=32,
                                   precision=resolve_extract_precision("bf16"))
    assert asked.precision.reason.startswith("bf16: as asked")
    with pytest.raises(dataclasses.FrozenInstanceError):
        asked.grid = 6  # type: ignore[misc]


def test_flags_become_the_same_request():
    args = build_parser().parse_args(["prepare", "data", "--grid", "7", "--text-encoder", "./minilm",
                                      "--image-size", "288"])
    assert feature_request(args) == FeatureRequest(image_size=288, grid=7, text_encoder="./minilm")
    assert feature_options(args) == FeatureOptions(image_size=288, grid=7, text_encoder="./minilm")
    unasked = feature_options(build_parser().parse_args(["prepare", "data"]))
    assert unasked == FeatureOptions() and unasked.precision.reason == "fp32: the default"


def test_the_options_name_their_extractors():
    options = FeatureOptions(grid=7, max_tokens=16)
    backbone, encoder = options.image_backbone(), options.encoder()
    assert (backbone.name, backbone.grid, backbone.regions, backbone.precision) == ("efficientnet_lite2", 7, 49, "fp32")
    assert (encoder.max_tokens, encoder.precision) == (16, "fp32")
