"""Checkpoints: written atomically (temp file + rename), read with `weights_only=True`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmca.config import ModelConfig
from mmca.errors import CheckpointError
from mmca.io import atomic_write
from mmca.model import MMCA

FORMAT = "mmca-checkpoint-v1"


def save_checkpoint(path: str | Path, model: MMCA, **extra: Any) -> Path:
    """Write the model's weights and config plus `extra` (plain data and tensors only, e.g.
    optimiser state, epoch, RNG states). A crash mid-write never leaves a truncated file."""
    payload = {"format": FORMAT, "config": model.config.to_dict(),
               "model": model.state_dict(), **extra}
    return atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw payload, loaded safely (no arbitrary code runs while unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}",
                              "train one with `mmca train` or pass the path of an existing .pt file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}",
                              "the file is corrupt or not an mmca checkpoint; use another one") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mmca checkpoint (format {FORMAT} expected)",
                              "pass a checkpoint written by `mmca train`")
    return payload


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[MMCA, dict[str, Any]]:
    """The model in eval mode, and the rest of the payload (epoch, metrics, ...)."""
    payload = read_checkpoint(path)
    model = MMCA(ModelConfig.from_dict(payload["config"]))
    model.load_state_dict(payload.pop("model"))
    return model.to(device).eval(), payload
