"""What the CPU (or GPU) can do, as the OS and the device report it: the engine and the feature
extractors both choose their number format from it (bf16 only where there are bf16 units).

A process held below its CPU's instruction set (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, the way
a CPU without bf16 is imitated) is reported as running below it, not as the CPU it runs on.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from mmca.errors import ConfigError

_NATIVE_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
_ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN, which runs the bf16 products, obeys these


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags, or None where the OS does not say (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return None


def cpu_model_name() -> str:
    """The CPU's model name as the OS reports it (Linux), else the machine type: what every
    measured figure names."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine() or "unknown CPU"


def native_bf16(device: str | torch.device = "cpu") -> tuple[bool | None, str]:
    """Whether the device has bf16 units, as the device reports it (None: it does not say)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        name = torch.cuda.get_device_name(dev)
        return major >= 8, f"{name} (compute capability {major}.{minor}; bf16 units from 8.0)"
    if dev.type != "cpu":
        return False, f"{dev.type} device (no bf16 decision for it: fp32)"
    capability = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    if flags is None:
        return None, f"CPU capability {capability}, feature flags unknown"
    have = [f for f in _NATIVE_CPU_FLAGS if f in flags]
    capped = [f"{k}={os.environ[k]}" for k in _ISA_CAPS if os.environ.get(k)]
    if have and (capped or not capability.startswith("AVX512")):
        return None, (f"CPU with {' and '.join(have)}, but this process runs below it "
                      f"({', '.join(capped) or 'capability ' + capability})")
    if have:
        return True, f"CPU capability {capability} with {' and '.join(have)}"
    return False, f"CPU capability {capability}, no {' / '.join(_NATIVE_CPU_FLAGS)} (bf16 is emulated)"


def usable_device(device: str | torch.device) -> torch.device:
    """The device named, checked to exist and to be usable by this PyTorch before anything is
    loaded onto it (a typo, a missing GPU or ordinal, a backend not built in: a ConfigError)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device {device!r} is not a device PyTorch knows",
                          "use 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "meta":  # holds shapes only: every value computed there would be missing
        raise ConfigError("device meta holds no data; nothing can be computed on it", "use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {dev} asked for, but this PyTorch sees no CUDA device",
                          "use the cpu, or install a CUDA build of PyTorch")
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as err:  # a missing ordinal (cuda:7), a backend not built in
        raise ConfigError(f"device {dev} cannot be used here: {str(err).splitlines()[0]}",
                          "use 'cpu', or a device this machine has") from err
    return dev
