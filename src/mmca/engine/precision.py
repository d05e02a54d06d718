"""Which precision the engine's approximate paths run in: bfloat16 only where the device has
bf16 units, float32 elsewhere.

bf16 halves memory traffic and, on hardware with bf16 units (CPUs with AVX512_BF16 or AMX,
NVIDIA GPUs from Ampere on), runs matrix products several times faster. Elsewhere it is
emulated: on an AVX2-only CPU a bf16 product ran ~40x slower than float32 (docs/engine.md). So
"auto" asks the device: the CPU's feature flags (Linux /proc/cpuinfo) or the GPU's compute
capability; where neither is known, or where the process is held below the CPU's instruction
set (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), it times a few small matrix products in both dtypes.
The decision is cached per device for the process; it is deterministic wherever the flags are
readable, so a resumed run decides as the run it resumes did.

Exact modes (exact and exhaustive ranks, exact top-k) never take bf16 from "auto": bf16 moves
scores by ~1e-2 and ranks with them.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from mmca.hardware import native_bf16

CHOICES = ("auto", "fp32", "bf16")
_PROBE_SIZE = 256  # 256^3 products: ~1 ms in fp32, ~40 ms where bf16 is emulated
_PROBE_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much to be chosen on a probe alone


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "fp32" or "bf16"
    reason: str  # one line for people and logs

    def to_dict(self) -> dict[str, str]:
        return {"precision": self.precision, "reason": self.reason}


def _timed_product(dtype: torch.dtype, device: torch.device) -> float:
    """Best of 3 timings of one _PROBE_SIZE³ product (the best is robust to a busy machine)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(_PROBE_SIZE, _PROBE_SIZE, generator=g).to(device, dtype)
    b = torch.randn(_PROBE_SIZE, _PROBE_SIZE, generator=g).to(device, dtype)
    a @ b  # warm-up (kernel selection, allocation)
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


@lru_cache(maxsize=None)
def measured_bf16_speedup(device: str = "cpu") -> float:
    """fp32 time / bf16 time of the same matrix product on `device` (> 1: bf16 is faster)."""
    dev = torch.device(device)
    return _timed_product(torch.float32, dev) / _timed_product(torch.bfloat16, dev)


@lru_cache(maxsize=None)
def _auto(device: str) -> PrecisionChoice:
    native, what = native_bf16(device)
    if native is None:
        speedup = measured_bf16_speedup(device)
        native = speedup >= _PROBE_MIN_SPEEDUP
        what += f"; measured bf16 {speedup:.2f}x the speed of fp32"
    return PrecisionChoice("bf16" if native else "fp32", f"auto: {what}")


def resolve_precision(requested: str, device: str | torch.device = "cpu", exact: bool = False) -> PrecisionChoice:
    """The precision to run in: `requested` ("auto", "fp32" or "bf16") on `device`.

    `exact`: the caller's results must equal float32 ranks (exact and exhaustive modes), so
    "auto" means fp32 there. An explicit "bf16" where the device emulates it is obeyed but
    warned about, with the measured slowdown."""
    if requested not in CHOICES:
        raise ValueError(f"precision must be one of {', '.join(CHOICES)}, not {requested!r}")
    dev = str(torch.device(device))
    if requested == "fp32":
        return PrecisionChoice("fp32", "fp32: as asked")
    if requested == "auto":
        if exact:
            return PrecisionChoice("fp32", "auto: fp32, since exact results need float32 scores")
        return _auto(dev)
    native, what = native_bf16(dev)
    if not native:
        speedup = measured_bf16_speedup(dev)
        if speedup < 1.0:
            warnings.warn(f"bf16 was asked for, but on this device it is emulated ({what}): measured "
                          f"{1 / speedup:.1f}x slower than fp32 here; use --precision auto or fp32",
                          stacklevel=2)
    return PrecisionChoice("bf16", f"bf16: as asked ({what})")
