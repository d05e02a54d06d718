"""The full model against its equal-budget α = 0 ablation over several seeds (docs/results.md,
"Over seeds"): `mmca sample --preset P --seed S` for each seed (finished runs are reused,
interrupted ones resume), then mean ± sample standard deviation of dev rsum and both R@1 for each
model, and of the paired difference (same seed: same initialisation, data order and views).

    python benchmarks/seeds.py ../shared/data/flickr8k --preset cpu --seeds 0 1 2 --out runs/seeds
    python benchmarks/seeds.py ../shared/data/flickr8k --preset sample --out runs/g7 -- --grid 7 --mirror-images on
    python benchmarks/seeds.py --report runs/seeds/seed0 runs/seeds/seed1 ...   # table only
    python benchmarks/seeds.py --report ... --until-epoch 6   # as if stopped after epoch 6
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

KEYS = ("rsum", "i2t_r1", "t2i_r1")
MODELS = {"α = 0 ablation": "alpha0", "MMCA": "mmca"}


def best_metrics(run: Path, until: int | None = None) -> dict[str, dict[str, float]]:
    """Each model's best epoch (best.pt), or, with `until`, the best epoch among the first
    `until` of its log whose model best.pt could hold (the full model's: α > 0), i.e. the run
    as if stopped there (the cpu schedule stopped at epoch 5 is the `sample` preset's, with
    mirrored views)."""
    from mmca.checkpoint import read_checkpoint

    out = {}
    for name, sub in MODELS.items():
        if until is None:
            payload = read_checkpoint(run / sub / "best.pt")
            out[name] = {"epoch": payload["epoch"], **{k: float(payload["metrics"][k]) for k in KEYS}}
            continue
        with open(run / sub / "log.csv", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= until]
        if len(rows) < until:
            raise SystemExit(f"{run / sub} has {len(rows)} epochs logged, not {until}")
        full = [r for r in rows if name != "MMCA" or float(r["alpha"]) > 0]
        best = max(full, key=lambda r: float(r["rsum"]))
        out[name] = {"epoch": int(best["epoch"]), **{k: float(best[k]) for k in KEYS}}
    return out


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def report(runs: list[Path], until: int | None = None) -> str:
    rows = {run.name: best_metrics(run, until) for run in runs}
    lines = ["| run | model | best epoch | rsum | i2t R@1 | t2i R@1 |", "|---|---|---|---|---|---|"]
    for run, models in rows.items():
        for name, m in models.items():
            lines.append(f"| {run} | {name} | {m['epoch']} | " + " | ".join(f"{m[k]:.1f}" for k in KEYS) + " |")
    for name in MODELS:
        lines.append(f"| **mean ± sd** | {name} | | "
                     + " | ".join(mean_sd([r[name][k] for r in rows.values()]) for k in KEYS) + " |")
    diffs = {k: [r["MMCA"][k] - r["α = 0 ablation"][k] for r in rows.values()] for k in KEYS}
    lines.append("| **paired difference** | MMCA − ablation | | " + " | ".join(mean_sd(diffs[k]) for k in KEYS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", type=Path)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("runs/seeds"))
    p.add_argument("--report", nargs="+", type=Path, metavar="RUN", help="only print the table of these runs")
    p.add_argument("--until-epoch", type=int, metavar="N",
                   help="report the runs as if stopped after epoch N (from their logs)")
    p.epilog = "Flags after -- go to every `mmca sample` run (e.g. -- --grid 7 --mirror-images off)."
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args, flags = p.parse_args(argv[:cut]), argv[cut + 1:]
    runs = args.report
    if runs is None:
        if args.dataset is None:
            p.error("give DATASET_DIR (or --report RUN...)")
        runs = []
        for seed in args.seeds:
            out = args.out / f"seed{seed}"
            subprocess.run([sys.executable, "-m", "mmca", "sample", str(args.dataset), "--preset", args.preset,
                            "--seed", str(seed), "--out", str(out), "--no-progress", *flags], check=True)
            runs.append(out)
    print(report(runs, args.until_epoch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
