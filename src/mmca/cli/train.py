"""`mmca train`: train MMCA on a prepared dataset with a named preset."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mmca.cli.features import add_feature_arguments, checkpoint_feature_spec, feature_options, positive_int
from mmca.config import PRESETS, preset
from mmca.dist import add_arguments as add_dist_arguments
from mmca.dist import init_from_env
from mmca.errors import MmcaError
from mmca.folders import require_writable
from mmca.hardware import usable_device

NAME = "train"
HELP = "train a model (hardest-negative triplet loss, best checkpoint by dev rsum)"
DESCRIPTION = """\
Train MMCA on DATASET_DIR (either layout of docs/data.md; features are prepared and cached on
first use, like `mmca prepare`). After every epoch the model is evaluated on the validation
split with the exact pruned protocol; the checkpoint with the best rsum is kept.

The run directory (--out) gets: config.json, last.pt (resumable state, rewritten atomically),
best.pt, log.csv (one row per epoch), curves.png (loss and dev rsum per epoch).
Interrupt at any time (Ctrl-C, or even kill -9) and continue with the same command plus
--resume: the result is the same as an uninterrupted run. The run records its train and
validation data; --resume on other data is refused.

Several processes (docs/distributed.md): `torchrun --nproc-per-node N -m mmca train ...` splits
every global batch (--batch-size) over the N ranks with the loss and gradient of one process;
a run can be resumed with another N.

presets:
""" + "\n".join(f"  {name:8s} {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr:g}"
                + (f", α = 0 until epoch {cfg.cross_from_epoch}" if cfg.cross_from_epoch else "")
                for name, cfg in PRESETS.items())


def epoch_list(text: str) -> tuple[int, ...]:
    """'8' or '4,8' -> (4, 8); '' -> () (no decay)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epochs like '8' or '4,8', got {text!r}") from None


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected 'on' or 'off', got {text!r}")
    return text == "on"


# Command-line overrides of the preset: flag -> (TrainConfig field, type).
OVERRIDES = {
    "epochs": int, "batch_size": int, "lr": float, "lr_decay_epochs": epoch_list,
    "warmup_epochs": int, "cross_from_epoch": int, "cross_lr_scale": float,
    "grad_clip": float, "margin": float, "seed": int, "mining_precision": str, "mirror_images": on_off,
    "model_alpha": float, "model_d": int, "model_heads": int, "model_dropout": float,
}


def check_run_dir(out: Path, inputs: tuple[Path, ...]) -> None:
    """The run directory must be new, an empty folder or a run folder, outside the inputs, and
    writable: a user's folder or an exported model directory is refused and left as it is."""
    require_writable(out, "run", inputs=inputs)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise MmcaError(f"cannot write the run directory {out}: {err.strerror}",
                        "choose a directory you can write, or fix its permissions") from err


# --hidden first: torchrun's own parser takes `--d` for an abbreviation of its --duplicate-* options
ALIASES = {"--d": ("--hidden", "--d")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", type=Path, metavar="DATASET_DIR")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="training recipe (default: cpu)")
    p.add_argument("--out", type=Path, required=True, help="run directory: new, empty, or a run (with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--init-from", type=Path, help="start from this checkpoint's weights (e.g. an α = 0 run)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="dev")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--cache", type=Path, help="feature cache directory (default: ~/.cache/mmca)")
    add_feature_arguments(p)
    p.add_argument("--captions-per-image", type=positive_int, default=5)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    add_dist_arguments(p)
    group = p.add_argument_group("preset overrides")
    for name, kind in OVERRIDES.items():
        flag = "--" + (name[6:] if name.startswith("model_") else name).replace("_", "-")
        group.add_argument(*ALIASES.get(flag, (flag,)), dest=name, type=kind, default=None)


def run(args: argparse.Namespace) -> int:
    from mmca.evaluate import format_table
    from mmca.features.prepare import open_dataset
    from mmca.train import Trainer

    changes = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    config = preset(args.preset).replace(**changes)
    usable_device(args.device)  # a clear error before any feature is computed
    shard = init_from_env(args.device, args.dist_backend, args.dist_timeout)  # one shard without torchrun
    if shard.main:
        inputs = tuple(p for p in (args.dataset, args.cache, args.init_from) if p is not None)
        check_run_dir(args.out, inputs)  # before any feature is computed
    # a resumed run, or one initialised from a checkpoint, adopts that checkpoint's features
    adopted = args.out / "last.pt" if args.resume and (args.out / "last.pt").is_file() else args.init_from
    features = feature_options(args, checkpoint_feature_spec(adopted) if adopted else None)
    common = dict(cache_dir=args.cache, captions_per_image=args.captions_per_image,
                  progress=not args.no_progress and shard.main)
    train_set, dev_set = shard.main_first(lambda: (
        open_dataset(args.dataset, args.train_split, features, mirror=config.mirror_images, **common),
        open_dataset(args.dataset, args.val_split, features, **common)))
    trainer = Trainer(config, train_set, dev_set, args.out, device=shard.device_for(args.device), resume=args.resume,
                      init_from=args.init_from, progress=not args.no_progress, shard=shard)
    summary = trainer.run()
    if not shard.main:
        return 0
    best = summary["best_epoch"]
    if best is None:  # TrainConfig guarantees a candidate epoch; this is a damaged run directory
        raise MmcaError(f"{args.out} holds no best.pt matching its log", "start the run in a new --out directory")
    print(f"\nbest epoch {best['epoch']} of {config.epochs} (features: {trainer.spec.describe()}): {summary['best']}")
    name = "MMCA" if config.model.alpha else "α = 0 (S = i0·c0)"
    print(format_table({f"{name} ({args.val_split}, epoch {best['epoch']})": best}))
    return 0
