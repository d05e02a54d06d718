"""Typed configuration: the model, training, and the named presets (configs as data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of MMCA (SPEC §1; paper defaults)."""

    img_dim: int = 1280  # D_img: MobileNetV2 grid cells; 2048 for bottom-up features
    txt_dim: int = 384  # D_txt: all-MiniLM-L6-v2; 768 for BERT-base
    d: int = 256  # hidden size
    heads: int = 16
    ffn_dim: int | None = None  # None = d, as Eq. 4 defines W1, W2 in R^{d x d}
    alpha: float = 0.2  # weight of the cross-attention score
    cnn_filters: int = 256  # per window size (1, 2, 3)
    windows: tuple[int, ...] = (1, 2, 3)
    dropout: float = 0.1
    text_norm: str = "l2"  # "l2" (SPEC) or "layernorm_l2" (Eq. 7 read literally, then l2)

    @property
    def ffn(self) -> int:
        return self.d if self.ffn_dim is None else self.ffn_dim

    def __post_init__(self) -> None:
        if self.d % self.heads:
            raise ValueError(f"d={self.d} must be divisible by heads={self.heads}")
        if self.text_norm not in ("l2", "layernorm_l2"):
            raise ValueError(f"text_norm must be 'l2' or 'layernorm_l2', not {self.text_norm!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["windows"] = list(self.windows)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in raw.items() if k in known}
        if "windows" in kw:
            kw["windows"] = tuple(kw["windows"])
        return cls(**kw)
