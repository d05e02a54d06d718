"""`mmca export`: a checkpoint as a self-describing model directory.

    DIR/config.json        model config, feature spec, training config, the dev metrics it was
                           chosen on, where it came from, the mmca version (plain JSON)
    DIR/model.safetensors  the weights (safetensors: loading them runs no code)
    DIR/README.md          a short model card for people

`mmca.load(DIR)` and every command that takes --checkpoint accept the directory. It is written
next to its final place and renamed into it, so an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mmca.checkpoint import MODEL_DIR_FORMAT, checkpoint_spec, is_model_dir, read_checkpoint
from mmca.errors import MmcaError
from mmca.metrics import DIRECTIONS, RECALL_AT


def export_model_dir(checkpoint: str | Path, out: str | Path, command: str | None = None) -> Path:
    """Write the model of `checkpoint` (a .pt file or another model directory) to `out`, which
    must not exist yet (or be empty). `command`: how the model was made, for the model card."""
    from safetensors.torch import save_file

    from mmca import __version__
    from mmca.search.index import checkpoint_identity

    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MmcaError(f"{out} already exists and is not an empty directory",
                        "choose a new directory for the export (nothing was overwritten)")
    payload = read_checkpoint(checkpoint)
    spec = checkpoint_spec(payload, checkpoint)
    weights = {k: v.contiguous() for k, v in payload["model"].items()}
    source = payload.get("source") if is_model_dir(checkpoint) else checkpoint_identity(checkpoint)
    config: dict[str, Any] = {
        "format": MODEL_DIR_FORMAT,
        "mmca_version": __version__,
        "config": payload["config"],
        "feature_spec": spec.to_dict(),
        "train_config": payload.get("train_config"),
        "epoch": payload.get("epoch"),
        "metrics": payload.get("metrics"),
        "source": source,
        "command": command or payload.get("command"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": MODEL_DIR_FORMAT})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(config), encoding="utf-8")
        _readable(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _readable(folder: Path) -> None:
    """Permissions of a normal folder (the umask's), not mkdtemp's owner-only 0700."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def model_card(config: dict[str, Any]) -> str:
    """README.md of a model directory: what the model is, what it was trained on, how well it
    did on the split it was chosen on, and how to use it."""
    from mmca.features.spec import FeatureSpec

    spec = FeatureSpec.from_dict(config["feature_spec"])
    model, train = config["config"], config.get("train_config") or {}
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
    if metrics:
        head = [f"{d} R@{k}" for d in DIRECTIONS for k in RECALL_AT] + ["rsum"]
        keys = [f"{d}_r{k}" for d in DIRECTIONS for k in RECALL_AT] + ["rsum"]
        lines += [f"## Validation (epoch {config.get('epoch')}, the epoch this model was chosen on)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                  "| " + " | ".join(f"{metrics[k]:.1f}" for k in keys) + " |", ""]
    if config.get("command"):
        lines += ["## Made with", "", "```", config["command"], "```", ""]
    source = config.get("source") or {}
    if source.get("sha256"):
        lines += [f"Exported from `{Path(source['path']).name}` (sha256 {source['sha256'][:16]}…).", ""]
    lines += ["## Use", "", "```python", "import mmca", "r = mmca.load(\"DIR\")",
              "images = r.encode_images([\"photo1.jpg\", \"photo2.jpg\"])",
              "for hit in r.search(\"a dog runs on the beach\", images, k=5):",
              "    print(hit.score, hit.item)", "```", "",
              "or `mmca evaluate DATASET --checkpoint DIR`, `mmca index --checkpoint DIR ...`.", ""]
    return "\n".join(lines)
