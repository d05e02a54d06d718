"""The number format the frozen extractors compute in: fp32, bf16 (autocast) or int8 (dynamic
quantisation of the text encoder's Linear layers), chosen by hardware or by the user.

What each one buys was measured with benchmarks/extract.py (docs/benchmarks.md, "Extraction
precision"): bf16 pays only where the CPU has bf16 units (the engine's detection,
`mmca.hardware.native_bf16`); int8 pays only where fbgemm's int8 kernels have VNNI
(AVX512_VNNI or AVX_VNNI): with plain AVX2 they ran MPNet no faster than fp32. The backbones
are all convolutions, which dynamic quantisation does not touch, so "int8" leaves images in
fp32. Features computed one way are a different feature set: the resolved precision of each
side is part of the feature spec, and a cache, model or index made another way is refused.

"auto" is decided from the CPU's flags and the process's instruction-set caps, never from a
timing, so the same machine always makes the same features (and finds its cache again).
"""

from __future__ import annotations

import copy
import os
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from mmca import hardware
from mmca.errors import MmcaError

CHOICES = ("auto", "fp32", "bf16", "int8")
FP32 = "fp32"
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
# fbgemm picks its kernels itself: ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA do not reach it,
# only this does ("AVX512_E1*" keep VNNI). A CPU without VNNI is imitated with it set to AVX2.
_FBGEMM_CAP = "FBGEMM_ENABLE_INSTRUCTIONS"


@dataclass(frozen=True)
class ExtractPrecision:
    """The resolved precision of each extractor, and why it was chosen (one line for people)."""

    image: str = FP32
    text: str = FP32
    reason: str = "fp32: the default"


def int8_engine() -> bool:
    """Whether this torch has fbgemm's dynamic int8 Linear kernels (x86 builds)."""
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


def vnni_int8() -> tuple[bool, str]:
    """Whether fbgemm's int8 products run on VNNI here: the CPU has it and fbgemm is not held below it."""
    flags = hardware.cpu_flags() or set()
    have = [f for f in _VNNI_FLAGS if f in flags]
    if not have:
        return False, "no VNNI (int8 products measured no faster than fp32)"
    fbgemm = os.environ.get(_FBGEMM_CAP, "")
    if fbgemm and not fbgemm.upper().startswith("AVX512_E1"):
        return False, f"CPU with {have[0]}, but fbgemm runs below it ({_FBGEMM_CAP}={fbgemm})"
    return True, f"CPU with {have[0]}"


def resolve_extract_precision(requested: str) -> ExtractPrecision:
    """The precision each extractor runs in for `requested` (one of CHOICES)."""
    if requested not in CHOICES:
        raise MmcaError(f"extraction precision must be one of {', '.join(CHOICES)}, not {requested!r}",
                        "pass --extract-precision auto, fp32, bf16 or int8")
    if requested == "int8" and not int8_engine():
        raise MmcaError("int8 extraction needs fbgemm's int8 kernels, which this torch build lacks (not x86)",
                        "pass --extract-precision fp32 or auto")
    if requested == FP32:
        return ExtractPrecision(reason="fp32: as asked")
    if requested == "bf16":
        return ExtractPrecision("bf16", "bf16", f"bf16: as asked ({hardware.native_bf16('cpu')[1]})")
    if requested == "int8":
        return ExtractPrecision(FP32, "int8", "int8: as asked (text encoder; images stay fp32)")
    native, what = hardware.native_bf16("cpu")
    if native:
        return ExtractPrecision("bf16", "bf16", f"auto: bf16, {what}")
    vnni, why = vnni_int8()
    if vnni and int8_engine():
        return ExtractPrecision(FP32, "int8", f"auto: int8 text, fp32 images ({why}; {what})")
    return ExtractPrecision(reason=f"auto: fp32 ({what}; {why})")


def autocast(precision: str) -> AbstractContextManager[object]:
    """bf16 autocast for a bf16 extractor; nothing for the others."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


class RowScaledInt8Linear(nn.Module):
    """A Linear layer run by fbgemm's dynamic int8 kernel, one quantisation scale per token.

    The dynamic kernel quantises its whole input with one scale, and a few tokens of a
    transformer carry activations hundreds of times larger than the rest: with that scale
    MPNet's token states kept a cosine of 0.55 to fp32. Dividing each row by its largest
    magnitude first (and multiplying the product back) gives every token its own scale on the
    same kernel: 0.987. Weights are quantised per output channel.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        bare = nn.Linear(linear.in_features, linear.out_features, bias=False)
        with torch.no_grad():
            bare.weight.copy_(linear.weight)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices are not the user's business
            self.quantized = torch.ao.quantization.quantize_dynamic(
                nn.Sequential(bare), {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig})[0]
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax(-1, keepdim=True).clamp_(min=1e-6)
        y = self.quantized(x / scale)
        return y.mul_(scale) if self.bias is None else torch.addcmul(self.bias, y, scale)


def quantize_linears(model: nn.Module) -> nn.Module:
    """A copy of `model` with every Linear layer replaced by a `RowScaledInt8Linear`."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, RowScaledInt8Linear(child))
    return model.eval()
