"""`mmca export`: a checkpoint as a self-describing model directory.

    DIR/config.json        model config, feature spec, training config, the dev metrics it was
                           chosen on, where it came from, the mmca version (plain JSON)
    DIR/model.safetensors  the weights (safetensors: loading them runs no code)
    DIR/README.md          a short model card for people

`mmca.load(DIR)` and every command that takes --checkpoint accept the directory. It is written
next to its final place, flushed, and renamed into it, so an interrupted export leaves nothing
half-written. Where the text encoder lay on the exporting machine is left out (the spec keeps
what identifies it: type, config hash, weight files, width, token limit).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from mmca.checkpoint import (
    MODEL_DIR_FORMAT,
    WEIGHTS_DIGEST,
    checkpoint_identity,
    checkpoint_spec,
    file_sha256,
    is_model_dir,
    load_model,
    weights_metadata,
)
from mmca.data.spec import FeatureSpec
from mmca.engine.guards import require_finite_weights
from mmca.errors import MmcaError
from mmca.folders import mark
from mmca.metrics import DIRECTIONS, RECALL_AT
from mmca.version import __version__


def export_model_dir(checkpoint: str | Path, out: str | Path, command: str | None = None) -> Path:
    """Write the model of `checkpoint` (a .pt file or another model directory) to `out`, which
    must not exist yet. The model is loaded and checked first (shapes, finite weights), so an
    export is always loadable. `command`: how the model was made, for the model card."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() or out.is_symlink():
        raise MmcaError(f"{out} already exists", "choose a new directory for the export (nothing was overwritten)")
    model, payload = load_model(checkpoint)  # the shape checks of every load
    require_finite_weights(model)
    spec = checkpoint_spec(payload, checkpoint)
    # where the text encoder lay on this machine is provenance, not identity: a model directory
    # travels, and a path in it must not decide which local folder a later load reads
    spec = replace(spec, text=replace(spec.text, model_dir=None))
    if is_model_dir(checkpoint):
        source = payload.get("source")
    else:
        ident = checkpoint_identity(checkpoint)
        source = {"file": Path(ident["path"]).name, "sha256": ident["sha256"]}
    config: dict[str, Any] = {
        "format": MODEL_DIR_FORMAT,
        "mmca_version": __version__,
        "config": model.config.to_dict(),
        "feature_spec": spec.to_dict(),
        "train_config": payload.get("train_config"),
        "epoch": payload.get("epoch"),
        "metrics": payload.get("metrics"),
        "source": source,
        "command": command or payload.get("command"),
    }
    try:
        _write(out, {k: v.contiguous() for k, v in model.state_dict().items()}, config)
    except OSError as err:
        raise MmcaError(f"cannot write {out}: {err.strerror or err}",
                        "choose a directory you can write to, on a disk with room") from err
    return out


def _write(out: Path, weights: dict, config: dict[str, Any]) -> None:
    """The three files in a temporary folder next to `out`, flushed to disk, then renamed into
    place: a crash leaves no half-written model directory. Each of the two model files
    records the other's digest (`mmca.checkpoint.require_as_written`)."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata=weights_metadata(config))
        config = {**config, WEIGHTS_DIGEST: file_sha256(tmp / "model.safetensors")}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(config), encoding="utf-8")
        mark(tmp, "model")
        _readable(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        tmp.rename(out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _readable(folder: Path) -> None:
    """Permissions of a normal folder (the umask's), not mkdtemp's owner-only 0700."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def model_card(config: dict[str, Any]) -> str:
    """README.md of a model directory: what the model is, what it was trained on, how well it
    did on the split it was chosen on, and how to use it."""
    spec = FeatureSpec.from_dict(config["feature_spec"])
    model, train = config["config"], config.get("train_config")
    train = train if isinstance(train, dict) else {}
    lines = ["# MMCA model", "",
             "Multi-Modality Cross Attention (Wei et al., CVPR 2020) for image-sentence matching, "
             f"exported by mmca {config['mmca_version']}.", "",
             "## Features it expects", "", f"- {spec.describe()}",
             "- images: photos through that backbone (`mmca.load(DIR).encode_images(paths)` computes them)"
             if spec.image.grid is not None else "- images: precomputed region features of that shape", "",
             "## Model", "",
             f"d {model['d']}, {model['heads']} heads, α {model['alpha']}, text CNN {model['cnn_filters']} "
             f"filters x windows {tuple(model['windows'])}, dropout {model['dropout']}.", ""]
    if train:
        lines += ["## Training", "",
                  f"{train.get('epochs')} epochs, batch {train.get('batch_size')}, lr {train.get('lr')} "
                  f"(decay at {train.get('lr_decay_epochs')}), margin {train.get('margin')}, seed {train.get('seed')}"
                  + (f"; cross module from epoch {train['cross_from_epoch'] + 1}" if train.get("cross_from_epoch")
                     else "") + ("; mirrored photos" if train.get("mirror_images") else "") + ".", ""]
    metrics = config.get("metrics")
    keys = [f"{d}_r{k}" for d in DIRECTIONS for k in RECALL_AT] + ["rsum"]
    if isinstance(metrics, dict) and all(isinstance(metrics.get(k), (int, float)) for k in keys):
        head = [f"{d} R@{k}" for d in DIRECTIONS for k in RECALL_AT] + ["rsum"]
        lines += [f"## Validation (epoch {config.get('epoch')}, the epoch this model was chosen on)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                  "| " + " | ".join(f"{metrics[k]:.1f}" for k in keys) + " |", ""]
    if config.get("command"):
        lines += ["## Made with", "", "```", config["command"], "```", ""]
    source = config.get("source") or {}
    if isinstance(source, dict) and source.get("sha256"):
        name = source.get("file") or Path(str(source.get("path", "checkpoint"))).name
        lines += [f"Exported from `{name}` (sha256 {str(source['sha256'])[:16]}…).", ""]
    lines += ["## Use", "", "```python", "import mmca", "r = mmca.load(\"path/to/this/directory\")",
              "images = r.encode_images([\"photo1.jpg\", \"photo2.jpg\"])",
              "for hit in r.search(\"a dog runs on the beach\", images, k=5):",
              "    print(hit.score, hit.item)", "```", "",
              "or `mmca evaluate DATASET --checkpoint DIR`, `mmca index --checkpoint DIR ...`.", ""]
    return "\n".join(lines)
