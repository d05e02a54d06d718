"""Checkpoints: written atomically (temp file + rename), read with `weights_only=True`; and
model directories (`mmca export`: config.json + model.safetensors), read without unpickling."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from mmca.config import ModelConfig
from mmca.errors import CheckpointError
from mmca.data.spec import FeatureSpec
from mmca.atomic import atomic_write
from mmca.model import MMCA

FORMAT = "mmca-checkpoint-v1"
MODEL_DIR_FORMAT = "mmca-model-dir-v1"
MODEL_DIR_FILES = ("config.json", "model.safetensors")


def save_checkpoint(path: str | Path, model: MMCA, feature_spec: FeatureSpec, **extra: Any) -> Path:
    """Write the model's weights and config, the spec of the features it was trained on, and
    `extra` (plain data and tensors only, e.g. optimiser state, epoch, RNG states). A crash
    mid-write never leaves a truncated file."""
    payload = {"format": FORMAT, "config": model.config.to_dict(), "feature_spec": feature_spec.to_dict(),
               "model": model.state_dict(), **extra}
    return atomic_write(path, lambda f: torch.save(payload, f))


def checkpoint_spec(payload: dict[str, Any], path: str | Path) -> FeatureSpec:
    """The feature spec a checkpoint was trained with; a clear error for checkpoints written
    before mmca recorded it (their grid, input size and text encoder are unknown)."""
    if "feature_spec" not in payload:
        raise CheckpointError(
            f"{path} records no feature spec: it was written by an older mmca (before feature specs), which did "
            "not store the grid, image size and text encoder the model was trained on",
            "retrain with this version (`mmca train`); evaluating it on guessed features could print "
            "wrong numbers without any warning")
    return FeatureSpec.from_dict(payload["feature_spec"])


def is_model_dir(path: str | Path) -> bool:
    """A folder `mmca export` wrote: its weights file, or a config.json of the model-directory
    format (a training run's folder also holds a config.json, of another kind)."""
    import json

    path = Path(path)
    if not path.is_dir():
        return False
    if (path / MODEL_DIR_FILES[1]).is_file():
        return True
    try:
        config = json.loads((path / MODEL_DIR_FILES[0]).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == MODEL_DIR_FORMAT


def read_model_dir(path: str | Path) -> dict[str, Any]:
    """A model directory's config and weights as a checkpoint payload. JSON and safetensors
    only: nothing is unpickled, so a directory from a stranger cannot run code."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    missing = [name for name in MODEL_DIR_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"model directory {path} lacks {', '.join(missing)}",
                              "export it again with `mmca export CHECKPOINT DIR`")
    try:
        payload = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {err}",
                              "export the model again with `mmca export`") from err
    if not isinstance(payload, dict) or payload.get("format") != MODEL_DIR_FORMAT:
        raise CheckpointError(f"{path} is not an mmca model directory (format {MODEL_DIR_FORMAT} expected)",
                              "pass a directory written by `mmca export`, or a checkpoint .pt file")
    try:
        weights = load_file(path / "model.safetensors")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path / 'model.safetensors'}: {err}",
                              "the file is damaged; export the model again") from err
    return {**payload, "format": FORMAT, "model": weights}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw payload, loaded safely (no arbitrary code runs while unpickling): from a .pt
    checkpoint or a model directory."""
    path = Path(path)
    if is_model_dir(path):
        return read_model_dir(path)
    if path.is_dir():
        best = path / "best.pt"
        raise CheckpointError(f"{path} is a directory, neither a checkpoint file nor a model directory",
                              f"pass {best}" if best.is_file() else
                              "pass a .pt file written by `mmca train` (e.g. RUN_DIR/best.pt) or a directory "
                              "written by `mmca export`")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}",
                              "train one with `mmca train` or pass the path of an existing .pt file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        # torch's own message may advise weights_only=False: never repeat unsafe advice
        reason = str(err).split("\n")[0] if "weights_only" not in str(err) else (
            "it holds objects other than tensors and plain data (a pickled program, refused for safety)")
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}",
                              "the file is corrupt or not an mmca checkpoint; use another one") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mmca checkpoint (format {FORMAT} expected)",
                              "pass a checkpoint written by `mmca train`")
    return payload


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[MMCA, dict[str, Any]]:
    """The model in eval mode, and the rest of the payload (epoch, metrics, feature spec, ...)."""
    payload = read_checkpoint(path)
    try:
        # built without memory first: a crafted config (d = 65536) must not allocate 50 GB
        with torch.device("meta"):
            model = MMCA(ModelConfig.from_dict(payload["config"]))
        weights = payload.pop("model")
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in weights.items()}
        if want != have:
            bad = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
            raise ValueError(f"its weights do not match its config (e.g. {bad[0]})")
        not_float = [k for k, v in weights.items() if not v.is_floating_point()]
        if not_float:
            raise ValueError(f"{not_float[0]} holds {weights[not_float[0]].dtype} values, not floats")
        # weights saved in another float type (e.g. converted to fp16) run in the model's float32
        model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, assign=True)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f"{path} is not a usable mmca checkpoint: {err}",
                              "the file is damaged or was edited; use a checkpoint written by `mmca train`") from err
    return model.to(device).eval(), payload


def load_model_and_spec(path: str | Path, device: str | torch.device = "cpu"
                        ) -> tuple[MMCA, FeatureSpec, dict[str, Any]]:
    """`load_model` plus the checkpoint's feature spec (refusing checkpoints that lack one)."""
    model, payload = load_model(path, device)
    return model, checkpoint_spec(payload, path), payload


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_identity(path: str | Path) -> dict[str, Any]:
    """Where the model is and the sha256 of its contents (a model directory: of its two files)."""
    path = Path(path).resolve()
    if is_model_dir(path):
        missing = [name for name in MODEL_DIR_FILES if not (path / name).is_file()]
        if missing:
            raise CheckpointError(f"model directory {path} lacks {', '.join(missing)}",
                                  "export it again with `mmca export CHECKPOINT DIR`")
        parts = "".join(file_sha256(path / name) for name in MODEL_DIR_FILES)
        return {"path": str(path), "sha256": hashlib.sha256(parts.encode()).hexdigest()}
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}",
                              "pass --checkpoint with a checkpoint written by `mmca train` or a model "
                              "directory written by `mmca export`")
    return {"path": str(path), "sha256": file_sha256(path)}
