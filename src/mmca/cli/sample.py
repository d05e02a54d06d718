"""`mmca sample`: the whole job on one dataset — prepare, train MMCA and its α = 0 ablation,
evaluate both on the validation split, print them beside the paper's Flickr30K row."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmca.checkpoint import checkpoint_identity
from mmca.cli.features import add_feature_arguments, feature_options
from mmca.cli.train import on_off
from mmca.config import PRESETS, preset
from mmca.dist import add_arguments as add_dist_arguments
from mmca.dist import init_from_env
from mmca.folders import mark, require_writable
from mmca.hardware import usable_device

NAME = "sample"
HELP = "the end-to-end job: prepare, train MMCA and the α = 0 ablation, evaluate, compare"
DESCRIPTION = """\
Run everything on DATASET_DIR (the README's main command runs it on the Flickr8k sample):

  1. prepare the train and validation splits (cached: a second run reuses the features);
  2. train the α = 0 ablation (self-attention module only, S = i0·c0) with --preset;
  3. train the full model (S = i0·c0 + α·i1·c1) with the same preset and budget: the CPU
     presets train the first epochs with the cross module off (S = i0·c0, ~10x cheaper)
     and switch it on for the last ones, so both runs see the same schedule and data order
     and differ only in the cross module (see docs/results.md). Those first epochs are the
     ablation's, bit for bit: they are trained once and the full model branches from the
     ablation's state after them;
  4. evaluate both best checkpoints on the validation split (exact protocol; the per-epoch
     validation already computed it) and print them beside the paper's Flickr30K 1K row;
  5. export the full model's best checkpoint to OUT/model (`mmca export`), ready for
     `mmca.load`, `mmca index --checkpoint` and `mmca evaluate --checkpoint`.

Runs go to --out (default runs/sample; new, empty, or a folder `mmca sample` made): a finished
run is reused, an interrupted one resumes.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", type=Path, metavar="DATASET_DIR")
    p.add_argument("--preset", default="sample", choices=sorted(PRESETS),
                   help="training recipe for both models (default: sample)")
    p.add_argument("--out", type=Path, default=Path("runs/sample"), help="where the two runs go")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="dev")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--seed", type=int, default=None, help="seed of both runs (default: the preset's, 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of both runs (default: the preset's, 5 for sample; --epochs 6 gives the "
                        "full model a second epoch: docs/results.md, \"Cutting the recipe\")")
    p.add_argument("--mining-precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="hardest-negative mining (default: the preset's, auto: bf16 only on bf16 hardware)")
    p.add_argument("--mirror-images", type=on_off, default=None, metavar="on|off",
                   help="train on each photo as is or mirrored at random; on extracts the train split twice "
                        "(default: the preset's: "
                        + ", ".join(f"{k} {'on' if c.mirror_images else 'off'}" for k, c in sorted(PRESETS.items()))
                        + ")")
    p.add_argument("--cache", type=Path, help="feature cache directory (default: ~/.cache/mmca)")
    add_feature_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    add_dist_arguments(p)


# The flags that override the preset's TrainConfig fields of the same name.
PRESET_OVERRIDES = ("seed", "epochs", "mining_precision", "mirror_images")
# The flags that change what `mmca sample` trains, as the exported model card repeats them.
RECIPE_FLAGS = ("preset", *PRESET_OVERRIDES, "backbone", "image_size", "grid", "text_encoder", "max_tokens",
                "extract_precision")


def command_line(args: argparse.Namespace) -> str:
    """The `mmca sample` command that trains this recipe again (the flags given, in a fixed order)."""
    words = ["mmca sample", str(args.dataset)]
    for name in RECIPE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            shown = ("on" if value else "off") if isinstance(value, bool) else value
            words.append(f"--{name.replace('_', '-')} {shown}")
    return " ".join(words)


def run(args: argparse.Namespace) -> int:
    from mmca.atomic import atomic_write, atomic_write_text
    from mmca.checkpoint import read_checkpoint
    from mmca.evaluate import PAPER_RESULTS, format_table
    from mmca.features.prepare import open_dataset
    from mmca.train import Trainer, prefix_config

    started = time.perf_counter()
    progress = not args.no_progress
    config = preset(args.preset).replace(**{name: getattr(args, name) for name in PRESET_OVERRIDES
                                            if getattr(args, name) is not None})
    features = feature_options(args)
    usable_device(args.device)  # a clear error before any feature is computed
    shard = init_from_env(args.device, args.dist_backend, args.dist_timeout)  # one shard without torchrun
    if shard.main:  # before any feature is computed: new, empty, or a sample folder
        require_writable(args.out, "sample", inputs=(args.dataset,) + ((args.cache,) if args.cache else ()))
        mark(args.out, "sample")
    say = print if shard.main else (lambda *a, **k: None)
    progress = progress and shard.main
    train_set, dev_set = shard.main_first(lambda: (  # rank 0 fills the feature cache first
        open_dataset(args.dataset, args.train_split, features, cache_dir=args.cache, progress=progress,
                     mirror=config.mirror_images),
        open_dataset(args.dataset, args.val_split, features, cache_dir=args.cache, progress=progress)))
    for ds in (train_set, dev_set):
        say("  ".join(f"{k}: {v}" for k, v in ds.summary().items()))

    runs = {"α = 0 ablation": (args.out / "alpha0", prefix_config(config)), "MMCA": (args.out / "mmca", config)}
    staged = config.cross_from_epoch if config.model.alpha else 0
    branch = args.out / "alpha0" / f"prefix-epoch{staged}.pt"  # the ablation's state after the shared epochs
    rows, timings = {}, {}
    for name, (out, cfg) in runs.items():
        say(f"\n== {name}: {cfg.epochs} epochs, preset {args.preset} -> {out}")
        t0 = time.perf_counter()
        trainer = Trainer(cfg, train_set, dev_set, out, device=shard.device_for(args.device), resume=True,
                          progress=progress, branch_from=branch if cfg is config and branch.exists() else None,
                          shard=shard)
        if cfg is not config and staged:
            trainer.run(until_epoch=staged)
            if shard.main and trainer.state.epoch == staged and not branch.exists():
                atomic_write(branch, lambda f, src=trainer.last_path: f.write(src.read_bytes()))
            shard.barrier()  # the branch point exists before any rank looks for it
        trainer.run()
        shard.barrier()  # rank 0 has written best.pt
        timings[name] = round(time.perf_counter() - t0, 1)
        best = read_checkpoint(out / "best.pt")
        rows[f"{name} (epoch {best['epoch']})"] = best["metrics"]
    if not shard.main:
        return 0
    model_dir = args.out / "model"  # the full model, ready for `mmca.load` / `mmca index`
    best_pt = runs["MMCA"][0] / "best.pt"
    if model_dir.exists():
        exported = json.loads((model_dir / "config.json").read_text()).get("source") or {}
        if exported.get("sha256") != checkpoint_identity(best_pt)["sha256"]:
            print(f"mmca sample: note: {model_dir} was exported from an earlier {best_pt}; "
                  f"remove it and run again to export this one", flush=True)
    else:
        from mmca.export import export_model_dir
        export_model_dir(best_pt, model_dir, command=command_line(args))
    ours = {f"{k} [{dev_set.name} {dev_set.split}]": v for k, v in rows.items()}
    table = format_table({**ours, "paper, Flickr30K 1K": PAPER_RESULTS["Flickr30K 1K"]})
    total = time.perf_counter() - started
    print(f"\n{table}\n\ntotal {total / 60:.1f} min (training: "
          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + ")")
    print(f"model: {model_dir} (python: mmca.load({str(model_dir)!r}); docs/api.md)")
    atomic_write_text(args.out / "results.json", json.dumps(
        {"preset": args.preset, "dataset": str(args.dataset), "split": args.val_split,
         "metrics": rows, "train_seconds": timings, "total_seconds": round(total, 1)}, indent=2))
    return 0
