"""What `mmca bench` measures, as typed options: the command line fills them, the benchmark's
child processes receive them as JSON (`to_dict` / `from_dict`), never as rebuilt flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmca.config import ModelConfig
from mmca.dist import DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class Workload:
    """The random model and inputs every part runs on (or a trained model on real features)."""

    device: str = "cpu"
    d: int = 256  # hidden size
    heads: int = 16
    regions: int = 36
    img_dim: int = 1280
    txt_dim: int = 384
    batch: int = 64  # training step's (global) batch
    rank_images: int = 100  # random gallery of N images x 5N captions for the ranks
    checkpoint: str | None = None  # a trained model instead of random weights
    dataset: str | None = None  # a prepared dataset root instead of random features
    split: str = "dev"

    def model_config(self, dropout: float = 0.0) -> ModelConfig:
        return ModelConfig(img_dim=self.img_dim, txt_dim=self.txt_dim, d=self.d, heads=self.heads, dropout=dropout)


@dataclass(frozen=True)
class MemoryOptions:
    """Part (d): peak memory ranking a big random gallery, each pass on a time-limited portion."""

    images: int = 5000
    captions: int = 25000
    seconds: float = 60.0
    image_block: int = 4
    storage: str | None = None  # bank storage dtype (None: the compute dtype, fp32)


@dataclass(frozen=True)
class EngineOptions:
    """Parts (a)-(d) of `mmca bench`."""

    work: Workload = field(default_factory=Workload)
    score_images: int = 32
    score_captions: int = 160
    mine_precision: str = "auto"
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    parts: str = "abcd"
    skip_big: bool = False
    fused_kernel: str = "on"  # (a): also time the fused pair kernel (compiling shapes not yet cached); off: engine only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "EngineOptions":
        return cls(**{**raw, "work": Workload(**raw["work"]), "memory": MemoryOptions(**raw["memory"])})


@dataclass(frozen=True)
class DistributedOptions:
    """`mmca bench --distributed`: 1 process x T threads against `ranks` ranks x T/ranks threads."""

    work: Workload = field(default_factory=Workload)
    ranks: int = 2
    threads: int | None = None  # shared by each side (None: this process's)
    steps: int = 3  # timed training steps after one warm-up (median)
    backend: str | None = None  # the process group's backend (None: nccl on CUDA, gloo on CPU)
    timeout: float = DEFAULT_TIMEOUT_S

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DistributedOptions":
        return cls(**{**raw, "work": Workload(**raw["work"])})


@dataclass(frozen=True)
class SearchOptions:
    """`mmca bench --search`: latency over a dataset's gallery, load over HTTP, gallery growth."""

    dataset: Path
    split: str = "dev"
    work: Path = Path("runs/bench-search")  # indexes and checkpoints it builds, reused by later runs
    queries: int = 200
    load_seconds: float = 30.0
    sizes: tuple[int, ...] = (10_000, 100_000)
    models: tuple[str, ...] = ("random", "trained")
    checkpoint: Path | None = None  # the trained model (None: runs/sample/mmca/best.pt, else runs/*/best.pt)
