"""Process-wide settings that make PyTorch's CPU work faster without changing any value.

glibc hands freed blocks above its mmap threshold back to the kernel and trims the heap's top
as soon as it holds more free memory than the trim threshold. The scoring kernel and a training
step free and reallocate tens of MB per block; the kernel then zero-fills those pages again on
first touch. Measured on a 2-core AMD EPYC: ~6,000 minor page faults per 64-pair block; the
block up to ~30 % slower than with the memory kept while the VM's cores were contended, a few
percent when quiet (docs/benchmarks.md, "Scoring engine"). Raising both
thresholds keeps freed memory in the process for reuse: the cost is that the resident size stays
near its peak instead of shrinking between blocks, for the rest of the process (a long-running
`mmca serve` included). `MMCA_RETAIN_MEMORY=0` in the environment leaves glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the ceiling of glibc's own dynamic threshold on 64-bit
TRIM_THRESHOLD = 512 << 20

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Keep freed heap memory in the process (glibc only; elsewhere a no-op). Idempotent.
    Returns whether the setting is in force."""
    global _applied
    if _applied is None:
        _applied = (os.environ.get("MMCA_RETAIN_MEMORY", "1") != "0"
                    and _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(param, value))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


__all__ = ["retain_freed_memory"]
