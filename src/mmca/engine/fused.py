"""The pair kernel fused by inductor (`torch.compile`), with its compiled code kept on disk.

`pairs.cross_dots` is ~40 tensor ops a block; eager PyTorch runs each as its own pass over the
block's rows. Compiled, the softmax pieces, LayerNorms, biases, masks and the text head's taps
become a few fused C++ loops between the matrix products (docs/benchmarks.md, "Fused pair
kernel"). Each block shape (pairs, regions, caption bucket length, sizes, dtype) compiles once,
with static shapes; inductor's FX-graph and AOT caches live under the mmca cache
(`$MMCA_CACHE_DIR/inductor/<torch version>`), so a later process loads the compiled code in
about a second instead of compiling it again (tens of seconds a shape on a 2-core CPU).

A cold compile costs more than a short job saves, so by default (`MMCA_FUSED_KERNEL=warm`) a
shape runs fused only once it is warm: compiled in this process or marked compiled on disk by
an earlier one (`mmca bench --warm-kernel` warms the shapes of the evaluation, search and
mining blocks). `on` compiles every shape when first met; `off` never uses the fused kernel.
"""

from __future__ import annotations

import json
import os
from dataclasses import astuple, dataclass
from pathlib import Path

import torch

from mmca.atomic import atomic_write_text
from mmca.engine.pairs import BlockRows, CrossWeights, cross_dots
from mmca.errors import MmcaError
from mmca.features.cache import default_cache_dir, digest

MODES = ("off", "warm", "on")
ENV = "MMCA_FUSED_KERNEL"
RECOMPILE_LIMIT = 64  # one static compile per block shape: far more than dynamo's default 8


class FusedKernelError(MmcaError):
    """The fused pair kernel cannot be used as asked."""


def fused_mode(mode: str | None = None) -> str:
    """The switch: `mode` if given, else $MMCA_FUSED_KERNEL, else "warm"."""
    mode = (mode if mode is not None else os.environ.get(ENV, "warm")).strip().lower()
    if mode not in MODES:
        raise FusedKernelError(f"unknown fused kernel mode {mode!r}",
                               f"set {ENV} (or --fused-kernel) to one of {', '.join(MODES)}")
    return mode


def kernel_cache_dir() -> Path:
    """Where inductor keeps the compiled kernels: one folder per torch version."""
    return default_cache_dir() / "inductor" / torch.__version__


@dataclass(frozen=True)
class BlockShape:
    """Everything the compiled code of one block depends on (its cache key)."""

    pairs: int
    regions: int
    length: int
    d: int
    heads: int
    ffn: int
    filters: int
    windows: tuple[int, ...]
    head_norm: bool
    dtype: str
    capability: str

    @classmethod
    def of(cls, w: CrossWeights, rows: BlockRows) -> "BlockShape":
        return cls(rows.qr.shape[0], rows.qr.shape[2], rows.qe.shape[2], w.d, w.heads,
                   w.ffn1_w.shape[1], w.filters, w.windows, w.head_norm is not None,
                   str(w.dtype).removeprefix("torch."), torch.backends.cpu.get_cpu_capability())

    @property
    def key(self) -> str:
        return digest([torch.__version__, *astuple(self)])[:24]


class FusedKernel:
    """`cross_dots` compiled per block shape, used where the switch allows it (CPU only: on
    CUDA the eager kernel's products dominate and the fused path is not measured)."""

    def __init__(self, mode: str | None = None, cache_dir: Path | None = None):
        self.mode = fused_mode(mode)
        wanted = Path(cache_dir) if cache_dir is not None else kernel_cache_dir()
        self.cache_dir = _in_effect or wanted  # one cache per process: see use_cache_dir
        self._compiled = None
        self._warm: set[str] = set()  # shapes compiled in this process
        self._ready: dict[BlockShape, bool] = {}

    def ready(self, shape: BlockShape) -> bool:
        """Whether a block of this shape runs fused (no cold compile unless the mode is "on");
        looked up on disk once per shape and process."""
        if shape not in self._ready:
            self._ready[shape] = self.mode == "on" or (self.mode == "warm" and self._marker(shape).is_file())
        return self._ready[shape] or shape.key in self._warm

    def marked(self) -> set[str]:
        """The keys of the block shapes marked compiled in the cache."""
        return {p.stem for p in (self.cache_dir / "warm").glob("*.json")}

    def __call__(self, w: CrossWeights, rows: BlockRows) -> torch.Tensor:
        """i1·c1 of the block, fused where `ready`, else by the eager kernel."""
        if rows.qr.device.type != "cpu" or not self.ready(BlockShape.of(w, rows)):
            return cross_dots(w, rows)
        return self.compiled(w, rows)

    def compiled(self, w: CrossWeights, rows: BlockRows) -> torch.Tensor:
        """i1·c1 by the compiled kernel whatever the mode: compiled now (cold) or loaded from
        the cache (warm) the first time a shape is met; the shape is then marked warm on disk."""
        out = self._kernel()(w, rows)
        shape = BlockShape.of(w, rows)
        if shape.key not in self._warm:
            self._warm.add(shape.key)
            self._mark(shape)
        return out

    def _kernel(self):
        if self._compiled is None:
            self.cache_dir = use_cache_dir(self.cache_dir)
            self._compiled = torch.compile(cross_dots, dynamic=False, fullgraph=True)
            # torch.compile has imported dynamo: allow one compile per block shape
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        return self._compiled

    def _marker(self, shape: BlockShape) -> Path:
        return self.cache_dir / "warm" / f"{shape.key}.json"

    def _mark(self, shape: BlockShape) -> None:
        """Record on disk that this shape's compiled code is in the cache."""
        try:
            atomic_write_text(self._marker(shape), json.dumps(
                {"torch": torch.__version__, **vars(shape)}) + "\n")
        except OSError:  # a read-only cache: the kernel still runs, the next process compiles again
            pass


_in_effect: Path | None = None


def use_cache_dir(path: Path) -> Path:
    """Point inductor's on-disk caches (FX graphs, AOT autograd, the compiled C++) at `path`,
    before the first compile, and return the folder in effect. Set through inductor's
    environment variables (read at compile time), so that importing the engine does not import
    the compiler. Only the first call of a process decides: dynamo keeps what it compiled in
    memory, so a later compile of a shape already met writes nothing to another folder, and a
    shape marked warm there would be a false promise."""
    global _in_effect
    if _in_effect is None:
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
        _in_effect = path
    return _in_effect


__all__ = ["BlockShape", "FusedKernel", "FusedKernelError", "MODES", "fused_mode", "kernel_cache_dir"]
