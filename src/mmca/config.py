"""Typed configuration: the model, training, and the named presets (configs as data)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from mmca.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of MMCA (docs/model.md; paper defaults)."""

    img_dim: int = 1280  # D_img: EfficientNet-Lite2 or MobileNetV2 grid cells; 2048 for bottom-up features
    txt_dim: int = 768  # D_txt: all-mpnet-base-v2 and BERT-base; 384 for all-MiniLM-L6-v2
    d: int = 256  # hidden size
    heads: int = 16
    ffn_dim: int | None = None  # None = d, as Eq. 4 defines W1, W2 in R^{d x d}
    alpha: float = 0.2  # weight of the cross-attention score
    cnn_filters: int = 256  # per window size (1, 2, 3)
    windows: tuple[int, ...] = (1, 2, 3)
    dropout: float = 0.1
    text_norm: str = "l2"  # "l2" (docs/model.md) or "layernorm_l2" (Eq. 7 read literally, then l2)

    @property
    def ffn(self) -> int:
        return self.d if self.ffn_dim is None else self.ffn_dim

    def __post_init__(self) -> None:
        for name in ("img_dim", "txt_dim", "d", "heads", "cnn_filters"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.d % self.heads:
            raise ConfigError(f"d={self.d} must be divisible by heads={self.heads}",
                              f"choose heads among the divisors of {self.d}, e.g. --heads 16 with --d 256")
        if self.ffn_dim is not None and self.ffn_dim < 1:
            raise ConfigError(f"ffn_dim={self.ffn_dim} must be positive (or None: the paper's d)")
        # The engine's exact bound |α·i1·c1| <= α needs α >= 0; a negative weight would also
        # reward disagreement between the cross-attended embeddings.
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ConfigError(f"alpha={self.alpha} must be a finite number >= 0 (the paper: 0.2; 0: the ablation)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if not self.windows or any(w < 1 for w in self.windows):
            raise ConfigError(f"windows={self.windows} must be positive window sizes")
        if self.text_norm not in ("l2", "layernorm_l2"):
            raise ConfigError(f"text_norm must be 'l2' or 'layernorm_l2', not {self.text_norm!r}")

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


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run, recorded in every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-4
    lr_decay_epochs: tuple[int, ...] = (10,)  # multiply the learning rate by lr_decay at these
    lr_decay: float = 0.1
    cross_lr_scale: float = 1.0  # learning-rate multiplier of the cross-attention module
    grad_clip: float | None = 2.0  # max gradient norm (peers clip at 2.0); None = off
    margin: float = 0.2
    warmup_epochs: int = 0  # epochs with the sum over all negatives before hardest negatives
    # no-grad hardest-negative search: "auto" (bf16 where the device has bf16 units), "fp32", "bf16"
    mining_precision: str = "auto"
    seed: int = 0
    val_max_rank: int | None = 10  # ranks exact below this in per-epoch validation (R@1/5/10 exact)
    save_every_steps: int = 100  # mid-epoch checkpoints, so an interrupted epoch resumes mid-way
    # Staged training: epochs before this (0-based) index train and validate the α = 0 model
    # (S = i0·c0, ~10x cheaper per epoch); the cross module joins from this epoch on.
    cross_from_epoch: int = 0
    # Augmentation: each training step shows every image as is or mirrored (left-right), at
    # random; the mirrored grids are features of their own, prepared with the split.
    mirror_images: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs={self.epochs} must be at least 1"),
            (self.batch_size >= 2, f"batch_size={self.batch_size} must be at least 2 (a batch of one "
                                   "pair has no negatives)"),
            (math.isfinite(self.lr) and self.lr >= 0, f"lr={self.lr} must be a number >= 0"),
            (math.isfinite(self.lr_decay) and self.lr_decay > 0, f"lr_decay={self.lr_decay} must be positive"),
            (all(e >= 1 for e in self.lr_decay_epochs), f"lr_decay_epochs={self.lr_decay_epochs} must be >= 1"),
            (math.isfinite(self.cross_lr_scale) and self.cross_lr_scale > 0,
             f"cross_lr_scale={self.cross_lr_scale} must be positive"),
            (self.grad_clip is None or (math.isfinite(self.grad_clip) and self.grad_clip > 0),
             f"grad_clip={self.grad_clip} must be positive (or None: no clipping)"),
            (math.isfinite(self.margin) and self.margin >= 0, f"margin={self.margin} must be >= 0"),
            (self.warmup_epochs >= 0, f"warmup_epochs={self.warmup_epochs} must be >= 0"),
            (self.mining_precision in ("auto", "fp32", "bf16"),
             f"mining_precision={self.mining_precision!r} must be 'auto', 'fp32' or 'bf16'"),
            # R@10 needs ranks exact below 10 at least
            (self.val_max_rank is None or self.val_max_rank >= 10,
             f"val_max_rank={self.val_max_rank} must be >= 10 (R@10 needs exact ranks below 10) or None"),
            (self.save_every_steps >= 1, f"save_every_steps={self.save_every_steps} must be >= 1"),
            (self.cross_from_epoch >= 0, f"cross_from_epoch={self.cross_from_epoch} must be >= 0"),
            (not self.model.alpha or self.cross_from_epoch < self.epochs,
             f"cross_from_epoch={self.cross_from_epoch} with epochs={self.epochs}: no epoch would train the "
             "full model (and there would be no best.pt); train more epochs than --cross-from-epoch"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        out["lr_decay_epochs"] = list(self.lr_decay_epochs)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in raw.items() if k in known}
        kw["model"] = ModelConfig.from_dict(kw.get("model", {}))
        kw["lr_decay_epochs"] = tuple(kw.get("lr_decay_epochs", ()))
        return cls(**kw)

    def differences(self, other: "TrainConfig") -> list[str]:
        """'epochs: 8 vs 6'-style lines for each field that differs (model fields as model.NAME)."""
        a, b = self.to_dict(), other.to_dict()
        out = [f"model.{k}: {a['model'][k]!r} vs {b['model'].get(k)!r}" for k in a["model"]
               if a["model"][k] != b["model"].get(k)]
        return out + [f"{k}: {a[k]!r} vs {b.get(k)!r}" for k in a if k != "model" and a[k] != b.get(k)]

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed; model fields may be given as `model_<name>`."""
        model_changes = {k[6:]: changes.pop(k) for k in list(changes) if k.startswith("model_")}
        if model_changes:
            changes["model"] = replace(self.model, **model_changes)
        return replace(self, **changes)


# Named presets; the feature dimensions (img_dim, txt_dim) always come from the data.
# `paper` is the paper's recipe for GPUs and bottom-up features; `cpu` and `sample` are for the
# Flickr8k sample on a 2-core laptop (docs/results.md says what each changes and why).
PRESETS: dict[str, TrainConfig] = {
    # fp32 mining, measured: a full model trained from scratch has nearly tied scores early on, so
    # bf16 mining recomputes nearly all B² pairs within its tie tolerance (6 s a step, fp32 1.5 s,
    # measured at the old tolerance 0.05; docs/results.md "Collapse"). The staged cpu presets
    # mine a trained i0·c0: "auto" there.
    "paper": TrainConfig(epochs=20, lr=2e-4, lr_decay_epochs=(10,), grad_clip=None, mining_precision="fp32"),
    "cpu": TrainConfig(epochs=8, lr=2e-4, lr_decay_epochs=(4,), warmup_epochs=1, cross_from_epoch=4,
                       cross_lr_scale=10.0, mirror_images=True),
    # `cpu` cut to 5 epochs (its full model's best epoch was the first with the cross module in
    # 2 of 3 seeds) and without mirrored views (a second extraction of the train photos, 3.5 of
    # the main job's minutes); what each cut costs: docs/results.md, "Cutting the recipe".
    "sample": TrainConfig(epochs=5, lr=2e-4, lr_decay_epochs=(4,), warmup_epochs=1, cross_from_epoch=4,
                          cross_lr_scale=10.0, mirror_images=False),
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
