"""The MobileNetV2 backbone: the shipped ImageNet weights load right, the grid has the promised
shape, odd image modes convert, and a broken file stops the run with its name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmca.errors import DataError
from mmca.features.backbone import IMAGE_SIZE, ImageBackbone, load_image, load_mobilenet_v2

# Flickr8k photos whose 5 captions all say "dog", checked by eye to show one dog clearly.
DOG_PHOTOS = {
    "1026685415_0431cbf574.jpg": "black retriever with a green toy on grass",
    "1094462889_f9966dafa6.jpg": "golden retriever in snow",
    "1244140539_da4804d828.jpg": "Yorkshire terrier on a white rug",
    "1072153132_53d2bb1b60.jpg": "border collie catching a ball",
}
IMAGENET_DOGS = range(151, 269)  # ImageNet-1k classes 151..268 are dog breeds
BORDER_COLLIE = 232


def _batch(paths: list[Path]) -> torch.Tensor:
    return torch.from_numpy(np.stack([load_image(p) for p in paths])).permute(0, 3, 1, 2)


def test_dog_photos_are_classified_as_dog_breeds(backbone: ImageBackbone, flickr8k: Path) -> None:
    images = _batch([flickr8k / "images" / name for name in DOG_PHOTOS])
    top4 = backbone.logits(images).topk(4).indices.tolist()  # (the 5th guess for the dog in snow: "doormat")
    for (name, what), classes in zip(DOG_PHOTOS.items(), top4):
        assert all(c in IMAGENET_DOGS for c in classes), f"{name} ({what}): top-4 {classes}"
    assert top4[3][0] == BORDER_COLLIE


def test_folded_network_matches_the_checkpoint(backbone: ImageBackbone, flickr8k: Path) -> None:
    """BatchNorm folding is an inference speed-up only: same logits as the network as loaded."""
    images = _batch([flickr8k / "images" / name for name in list(DOG_PHOTOS)[:2]])
    plain = load_mobilenet_v2(backbone.weights)
    with torch.inference_mode():
        expected = plain(backbone._normalise(images).contiguous())
    torch.testing.assert_close(backbone.logits(images), expected, atol=1e-3, rtol=1e-4)


def test_the_traced_trunk_computes_the_eager_trunks_features(backbone: ImageBackbone, flickr8k: Path) -> None:
    """The speed-up (TorchScript freeze + oneDNN fusion) changes no feature beyond float rounding,
    at any batch size (traced at batch 1)."""
    from mmca.features.backbone import _feature_trunk

    images = backbone._normalise(_batch([flickr8k / "images" / name for name in DOG_PHOTOS]))
    trunk = _feature_trunk(backbone.weights.resolve())
    assert isinstance(trunk, torch.jit.ScriptModule)  # the fast path is the one taken here
    with torch.inference_mode():
        torch.testing.assert_close(trunk(images), backbone.network.features(images), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grid", [6, 7])
def test_grid_shapes(grid: int, flickr8k: Path) -> None:
    images = _batch([flickr8k / "images" / name for name in DOG_PHOTOS])
    regions = ImageBackbone(grid=grid).extract_grid(images)
    assert regions.shape == (len(DOG_PHOTOS), grid * grid, 1280)
    assert torch.isfinite(regions).all() and (regions >= 0).all()  # after ReLU6


def test_regions_are_the_final_feature_map_average_pooled(backbone: ImageBackbone, flickr8k: Path) -> None:
    images = _batch([flickr8k / "images" / next(iter(DOG_PHOTOS))])
    with torch.inference_mode():
        fmap = backbone.network.features(backbone._normalise(images))
    assert fmap.shape[-2:] == (IMAGE_SIZE // 32, IMAGE_SIZE // 32)
    corner = fmap[0, :, :2, :2].mean(dim=(1, 2))  # 11 -> 7 cells: the first pools 2x2 of the map
    torch.testing.assert_close(ImageBackbone(grid=7).extract_grid(images)[0, 0], corner)


def test_other_sizes_are_resized(backbone: ImageBackbone, flickr8k: Path, tmp_path: Path) -> None:
    photo = Image.open(flickr8k / "images" / next(iter(DOG_PHOTOS))).resize((320, 200))
    photo.save(tmp_path / "wide.jpg")
    assert load_image(tmp_path / "wide.jpg").shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
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
    gray = load_image(paths[0])
    assert gray.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and (gray[..., 0] == gray[..., 2]).all()


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_broken_image_raises_naming_the_file(backbone: ImageBackbone, flickr8k: Path, tmp_path: Path, damage: str) -> None:
    good = flickr8k / "images" / next(iter(DOG_PHOTOS))
    bad = tmp_path / "broken.jpg"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"caption text, not a JPEG\n")
    out = np.zeros((2, 36, 1280), dtype=np.float16)
    with pytest.raises(DataError) as err:
        backbone.extract_files([good, bad], out)
    assert str(bad) in err.value.message
    assert "remove it from the split list" in (err.value.hint or "")
