"""The image backbones of the registry: each one's shipped ImageNet weights load right (real
photos get the right classes), the grid has the promised shape, the fast paths compute the plain
network's features, odd image modes convert, and a broken file stops the run with its name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmca.errors import DataError, MmcaError
from mmca.features.backbone import BACKBONES, ImageBackbone, _feature_trunk, _sha256, load_image, load_network

# Flickr8k photos whose 5 captions all say "dog", checked by eye to show one dog clearly.
DOG_PHOTOS = {
    "1026685415_0431cbf574.jpg": "black retriever with a green toy on grass",
    "1094462889_f9966dafa6.jpg": "golden retriever in snow",
    "1244140539_da4804d828.jpg": "Yorkshire terrier on a white rug",
    "1072153132_53d2bb1b60.jpg": "border collie catching a ball",
}
IMAGENET_DOGS = range(151, 269)  # ImageNet-1k classes 151..268 are dog breeds
BORDER_COLLIE, FLAT_COATED_RETRIEVER, GOLDEN_RETRIEVER = 232, 205, 207
NAMES = sorted(BACKBONES)


@pytest.fixture(scope="module", params=NAMES)
def any_backbone(request) -> ImageBackbone:
    return ImageBackbone(6, request.param)


def _batch(paths: list[Path], size: int = 352) -> torch.Tensor:
    return torch.from_numpy(np.stack([load_image(p, size) for p in paths])).permute(0, 3, 1, 2)


def test_dog_photos_are_classified_as_dog_breeds(any_backbone: ImageBackbone, flickr8k: Path) -> None:
    """Proof that the weights loaded right, not only that the shapes match: the top-3 ImageNet
    classes of each photo are dog breeds, and the right breed comes first where ImageNet has it."""
    images = _batch([flickr8k / "images" / name for name in DOG_PHOTOS], any_backbone.image_size)
    top3 = any_backbone.logits(images).topk(3).indices.tolist()
    for (name, what), classes in zip(DOG_PHOTOS.items(), top3):
        assert all(c in IMAGENET_DOGS for c in classes), f"{any_backbone.name}: {name} ({what}): top-3 {classes}"
    assert top3[3][0] == BORDER_COLLIE
    if any_backbone.name == "efficientnet_lite2":  # the stronger network also names the retrievers
        assert (top3[0][0], top3[1][0]) == (FLAT_COATED_RETRIEVER, GOLDEN_RETRIEVER)


def test_registry_entries_pin_their_weights() -> None:
    for entry in BACKBONES.values():
        assert _sha256(entry.weights_file().resolve()) == entry.weights_sha256, entry.name
        assert entry.native_size <= entry.image_size and entry.dim == 1280


def test_an_unknown_backbone_or_a_bad_size_is_refused() -> None:
    with pytest.raises(MmcaError, match="unknown image backbone 'resnet50'"):
        ImageBackbone(6, "resnet50")
    with pytest.raises(MmcaError, match="outside"):
        ImageBackbone(7, "mobilenet_v2", image_size=200)


def test_the_efficientnet_pads_like_tensorflow() -> None:
    """TensorFlow's "SAME": a stride-2 3x3 layer on an even side pads 0 left/top, 1 right/bottom."""
    from mmca.features.networks.efficientnet_lite import SameConv2d

    conv = SameConv2d(1, 1, 3, stride=2)
    conv.weight.data.zero_()
    conv.weight.data[0, 0, 0, 0] = 1.0  # picks the top-left input of each window
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert conv(x)[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]  # no padding row/column in front


def test_folded_network_matches_the_checkpoint(any_backbone: ImageBackbone, flickr8k: Path) -> None:
    """BatchNorm folding is an inference speed-up only: same logits as the network as loaded."""
    images = _batch([flickr8k / "images" / name for name in list(DOG_PHOTOS)[:2]], any_backbone.image_size)
    plain = load_network(any_backbone.name)
    with torch.inference_mode():
        expected = plain(any_backbone._normalise(images).contiguous())
    torch.testing.assert_close(any_backbone.logits(images), expected, atol=1e-3, rtol=1e-4)


def test_the_traced_trunk_computes_the_eager_trunks_features(any_backbone: ImageBackbone, flickr8k: Path) -> None:
    """The speed-up (TorchScript freeze + oneDNN fusion) changes no feature beyond float rounding,
    at any batch size (traced at batch 1). It is taken where it measured faster: always in bf16,
    in fp32 where the entry says so (not for EfficientNet-Lite2)."""
    images = any_backbone._normalise(_batch([flickr8k / "images" / name for name in DOG_PHOTOS],
                                            any_backbone.image_size))
    trunk = _feature_trunk(any_backbone.name, None, any_backbone.image_size)
    assert isinstance(trunk, torch.jit.ScriptModule) == (any_backbone.name == "mobilenet_v2")
    assert isinstance(_feature_trunk(any_backbone.name, None, any_backbone.image_size, "bf16"), torch.jit.ScriptModule)
    with torch.inference_mode():
        plain = load_network(any_backbone.name).trunk()(images.contiguous())
        torch.testing.assert_close(trunk(images), plain, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("grid", [6, 7])
def test_grid_shapes(grid: int, flickr8k: Path) -> None:
    images = _batch([flickr8k / "images" / name for name in DOG_PHOTOS])
    regions = ImageBackbone(grid=grid).extract_grid(images)
    assert regions.shape == (len(DOG_PHOTOS), grid * grid, 1280)
    assert torch.isfinite(regions).all() and (regions >= 0).all()  # after ReLU6


@pytest.mark.parametrize("size", [260, 352])
def test_regions_are_the_final_feature_map_average_pooled(any_backbone: ImageBackbone, flickr8k: Path,
                                                          size: int) -> None:
    backbone = ImageBackbone(7, any_backbone.name, size)
    images = _batch([flickr8k / "images" / next(iter(DOG_PHOTOS))], size)
    fmap = backbone.feature_map(images)
    side = -(-size // 32)  # 9 at 260 px, 11 at 352 px
    assert fmap.shape[-2:] == (side, side)
    corner = fmap[0, :, : -(-side // 7), : -(-side // 7)].mean(dim=(1, 2))  # the first of 7 cells pools 2x2
    torch.testing.assert_close(backbone.extract_grid(images)[0, 0], corner)


def test_other_sizes_are_resized(backbone: ImageBackbone, flickr8k: Path, tmp_path: Path) -> None:
    photo = Image.open(flickr8k / "images" / next(iter(DOG_PHOTOS))).resize((320, 200))
    photo.save(tmp_path / "wide.jpg")
    assert backbone.load_image(tmp_path / "wide.jpg").shape == (backbone.image_size, backbone.image_size, 3)
    tensor = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None]
    assert backbone.extract_grid(tensor).shape == (1, 36, 1280)


def test_grayscale_rgba_and_palette_images_convert(backbone: ImageBackbone, flickr8k: Path, tmp_path: Path) -> None:
    photo = Image.open(flickr8k / "images" / next(iter(DOG_PHOTOS)))
    paths = [tmp_path / "gray.jpg", tmp_path / "rgba.png", tmp_path / "palette.png"]
    photo.convert("L").save(paths[0])
    photo.convert("RGBA").save(paths[1])
    photo.convert("P").save(paths[2])
    out = np.zeros((3, 36, 1280), dtype=np.float16)
    backbone.extract_files(paths, out)
    assert np.isfinite(out).all() and (out.reshape(3, -1).max(axis=1) > 0).all()
    gray = backbone.load_image(paths[0])
    assert gray.shape == (352, 352, 3) and (gray[..., 0] == gray[..., 2]).all()


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_broken_image_raises_naming_the_file(backbone: ImageBackbone, flickr8k: Path, tmp_path: Path,
                                             damage: str) -> None:
    good = flickr8k / "images" / next(iter(DOG_PHOTOS))
    bad = tmp_path / "broken.jpg"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"caption text, not a JPEG\n")
    out = np.zeros((2, 36, 1280), dtype=np.float16)
    with pytest.raises(DataError) as err:
        backbone.extract_files([good, bad], out)
    assert str(bad) in err.value.message
    assert "remove it from the split list" in (err.value.hint or "")


def test_a_trunk_that_cannot_be_traced_falls_back_to_eager_with_a_warning_naming_the_cause() -> None:
    """An input too small for the first convolution makes tracing itself fail."""
    with pytest.warns(UserWarning,
                      match=r"traced mobilenet_v2 trunk is not available here \(RuntimeError: .*Kernel size"):
        trunk = _feature_trunk("mobilenet_v2", None, 0)
    assert not isinstance(trunk, torch.jit.ScriptModule)
    assert isinstance(_feature_trunk("mobilenet_v2", None, 64), torch.jit.ScriptModule)  # where tracing works
