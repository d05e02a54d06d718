"""Checkpoints: written atomically (temp file + rename), read with `weights_only=True`; and
model directories (`mmca export`: config.json + model.safetensors), read without unpickling.

A model directory is trusted only as it was written: config.json records the sha256 of
model.safetensors (`weights_sha256`), and the safetensors header records the sha256 of the
config (`config_sha256`, of every field but that one) with a copy of it, to name what an edit
changed. Both are checked on every load: a feature spec edited from grid 6 to 7 would make
every score differ without any error (the weights run on any grid), so it is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from mmca.atomic import atomic_write
from mmca.config import ModelConfig
from mmca.data.spec import FeatureSpec
from mmca.errors import CheckpointError
from mmca.model import MMCA

FORMAT = "mmca-checkpoint-v1"
MODEL_DIR_FORMAT = "mmca-model-dir-v1"
MODEL_DIR_FILES = ("config.json", "model.safetensors")
WEIGHTS_DIGEST = "weights_sha256"  # the config.json field holding model.safetensors' sha256


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


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(config: dict[str, Any]) -> str:
    """One text per config, however it was indented or ordered: what its digest is taken of."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def weights_metadata(config: dict[str, Any]) -> dict[str, str]:
    """The safetensors header of a model directory whose config.json holds `config` (without
    its weights digest, which is taken of the file this header is part of)."""
    text = canonical_json(config)
    return {"format": MODEL_DIR_FORMAT, "config_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "config": text}


def changed_fields(before: Any, after: Any, prefix: str = "") -> list[str]:
    """'feature_spec.image.grid: 6 as written, 7 now'-style lines for every leaf that differs."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [line for key in sorted(set(before) | set(after), key=str)
                for line in changed_fields(before.get(key), after.get(key), f"{prefix}{key}.")]
    return [] if before == after else [f"{prefix[:-1]}: {before!r} as written, {after!r} now"]


def is_model_dir(path: str | Path) -> bool:
    """A folder `mmca export` wrote: its weights file, or a config.json of the model-directory
    format (a training run's folder also holds a config.json, of another kind)."""
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
    only: nothing is unpickled, so a directory from a stranger cannot run code. Its digests
    are checked (`require_as_written`)."""
    from safetensors import SafetensorError, safe_open

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
        with safe_open(path / "model.safetensors", framework="pt") as f:
            metadata = f.metadata() or {}
            weights = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path / 'model.safetensors'}: {err}",
                              "the file is damaged; export the model again") from err
    require_as_written(path, payload, metadata)
    return {**payload, "format": FORMAT, "model": weights}


def require_as_written(path: Path, config: dict[str, Any], metadata: dict[str, str]) -> None:
    """Refuse a model directory whose weights or config.json are not the ones exported
    together, naming the fields an edit changed."""
    again = "export the model again from its checkpoint (`mmca export CHECKPOINT DIR`)"
    if WEIGHTS_DIGEST not in config or "config_sha256" not in metadata:
        raise CheckpointError(f"model directory {path} records no digests of its files (an older mmca wrote "
                              "it, or it was assembled by hand): it cannot be checked", again)
    if file_sha256(path / "model.safetensors") != config[WEIGHTS_DIGEST]:
        raise CheckpointError(f"{path / 'model.safetensors'} is not the file its config.json records "
                              f"({WEIGHTS_DIGEST} differs): the weights were replaced or changed", again)
    written = {k: v for k, v in config.items() if k != WEIGHTS_DIGEST}
    if weights_metadata(written)["config_sha256"] != metadata["config_sha256"]:
        try:
            before = json.loads(metadata.get("config", ""))
        except ValueError:
            before = None
        fields = changed_fields(before, written) if isinstance(before, dict) else ["(the original is not recorded)"]
        raise CheckpointError(f"{path / 'config.json'} was edited after export, and the model would score "
                              "differently than it was validated: " + "; ".join(fields), again)


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
    """`load_model` plus the checkpoint's feature spec (refusing checkpoints that lack one, or
    whose spec names features of another width than the weights take)."""
    model, payload = load_model(path, device)
    spec = checkpoint_spec(payload, path)
    require_spec_fits(spec, model.config, path)
    return model, spec, payload


def require_spec_fits(spec: FeatureSpec, config: ModelConfig, path: str | Path) -> None:
    wrong = [f"feature_spec.{side}.dim is {have}, but the weights take {want}-d {what} (config.{field})"
             for side, have, want, what, field in (("image", spec.image.dim, config.img_dim, "regions", "img_dim"),
                                                    ("text", spec.text.dim, config.txt_dim, "tokens", "txt_dim"))
             if have != want]
    if wrong:
        raise CheckpointError(f"{path} does not fit its own weights: " + "; ".join(wrong),
                              "the file is damaged or was edited; use a checkpoint written by `mmca train`")


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
