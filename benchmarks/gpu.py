"""The prepared accelerator run (`benchmarks/gpu.sh`): every GPU figure in one go, one table.

One command on a GPU machine measures everything below and finishes inside --budget seconds
(default 570):

  1. `mmca bench --only ab`: exhaustive scoring pairs/s, engine fp32 and bf16 vs the plain path,
     and one mined training step vs back-propagating all B² pairs;
  2. `mmca bench --only c` on random 1K x 5K and 5K x 25K galleries: exhaustive, exact and capped
     ranks (pair fraction, seconds, peak GPU memory);
  3. one `paper`-preset epoch on synthetic Flickr30K-scale precomp data (benchmarks/epoch.py),
     one process, then `torchrun` over every GPU present (when there are several).

Each step runs in its own process with a timeout taken from what is left of the budget; a step
that fails or runs out of time is reported as such and the others still run. --cpu-smoke runs the
same steps at toy size on the CPU (in the test suite), so the script is tested where no GPU is present.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = {
    "device": "cuda",
    "bench": [],
    "galleries": [1000, 5000],
    "epoch": [],
}
# toy sizes: the same code paths in seconds on a CPU
SMOKE = {
    "device": "cpu",
    "bench": ["--hidden", "32", "--heads", "4", "--regions", "4", "--img-dim", "16", "--txt-dim", "16",
              "--score-images", "4", "--score-captions", "8", "--batch", "8"],
    "galleries": [8, 16],
    "epoch": ["--images", "48", "--dev-images", "12", "--img-dim", "16", "--txt-dim", "16", "--regions", "4",
              "--hidden", "32", "--heads", "4", "--batch-size", "16"],
}


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def step(name: str, argv: list[str], budget: Budget, cap: float, env: dict, log) -> dict | None:
    """Run one step; its JSON result (the last JSON line it printed, or its --json file)."""
    timeout = min(cap, budget.left())
    if timeout < 5:
        log(f"[{name}] skipped: the budget is spent")
        return {"status": "skipped (budget)"}
    log(f"[{name}] {' '.join(argv)} (timeout {timeout:.0f} s)")
    t = time.perf_counter()
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"[{name}] ran out of time after {timeout:.0f} s")
        return {"status": f"timed out ({timeout:.0f} s)"}
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        log(f"[{name}] failed (exit {done.returncode}):\n{done.stderr[-1500:]}")
        return {"status": f"failed (exit {done.returncode})"}
    log(done.stdout.rstrip())
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    return {"status": "ok", "seconds": round(seconds, 1), **(json.loads(lines[-1]) if lines else {})}


def gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def describe_device(device: str) -> str:
    import torch
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}"
    return f"CPU ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="the same steps at toy size on the CPU")
    p.add_argument("--budget", type=float, default=570.0, help="seconds for everything (default 570)")
    p.add_argument("--work", type=Path, default=Path("runs/gpu-bench"), help="files and results go here")
    args = p.parse_args(argv)
    sizes = SMOKE if args.cpu_smoke else FULL
    device = sizes["device"]
    if device == "cuda" and not gpus():
        print("no CUDA device here: run with --cpu-smoke to check the script on a CPU", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.cpu_smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    log = print
    log(f"benchmarks/gpu.py on {describe_device(device)}; budget {args.budget:.0f} s")
    mmca = [sys.executable, "-m", "mmca", "bench", "--device", device, *sizes["bench"]]
    results = {}

    out = args.work / "bench-ab.json"
    results["bench"] = step("bench a+b", [*mmca, "--only", "ab", "--json", str(out)], budget, 150, env, log)
    if results["bench"]["status"] == "ok":
        results["bench"].update(json.loads(out.read_text()))
    for n in sizes["galleries"]:
        out = args.work / f"ranks-{n}.json"
        r = step(f"ranks {n}", [*mmca, "--only", "c", "--rank-images", str(n), "--json", str(out)],
                 budget, 90 if n <= 1000 else 240, env, log)
        if r["status"] == "ok":
            r.update(json.loads(out.read_text())["ranks"])
        results[f"ranks_{n}"] = r
    epoch = [str(HERE / "epoch.py"), "--device", device, "--work", str(args.work / "epoch"), "--no-progress",
             *sizes["epoch"]]
    results["epoch_1"] = step("epoch, 1 process", [sys.executable, *epoch], budget, 300, env, log)
    world = 2 if args.cpu_smoke else gpus()  # the smoke run checks the torchrun path with 2 gloo ranks
    if world > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
        results[f"epoch_{world}"] = step(f"epoch, {world} ranks", [*torchrun, *epoch], budget, 300, env, log)
    (args.work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    log("\n" + table(results))
    log(f"results: {args.work / 'results.json'}")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


def table(results: dict) -> str:
    rows = [("step", "figure")]
    b = results["bench"]
    if b["status"] == "ok":
        s = b["scoring"]
        rows += [("scoring pairs/s", f"plain {s['plain_pairs_per_s']:,.0f} | engine fp32 {s['fp32_pairs_per_s']:,.0f} "
                  f"({s['fp32_pairs_per_s'] / s['plain_pairs_per_s']:.1f}x) | bf16 {s['bf16_pairs_per_s']:,.0f} "
                  f"({s['bf16_pairs_per_s'] / s['plain_pairs_per_s']:.1f}x)"),
                 ("training step", f"B={b['training']['batch']}: mined {b['training']['mined_s']:.3f} s, all B² "
                  f"{b['training']['exhaustive_s']:.3f} s ({b['training']['speedup']:.1f}x)")]
    else:
        rows.append(("bench a+b", b["status"]))
    for key in [k for k in results if k.startswith("ranks_")]:
        r = results[key]
        if r["status"] != "ok":
            rows.append((f"ranks {key[6:]}", r["status"]))
            continue
        for mode in ("exhaustive", "exact", "exact_max_rank_10"):
            mem = r.get(f"{mode}_peak_gpu_gib")
            rows.append((f"{r['gallery'].split(' (')[0]} {mode}",
                         f"{r[mode + '_s']:.1f} s, pair fraction {r[mode + '_pair_fraction']:.2%}"
                         + (f", peak GPU {mem:.2f} GiB" if mem is not None else "")))
    for key in [k for k in results if k.startswith("epoch_")]:
        r = results[key]
        rows.append((f"epoch, {key[6:]} rank(s)", r["status"] if r["status"] != "ok" else
                     f"{r['captions']:,} captions, B={r['global_batch']}: train {r['train_s']} s "
                     f"({r['steps_per_s']} steps/s), val {r['val_s']} s"
                     + (f", peak GPU {r['peak_gpu_gib']} GiB" if r["peak_gpu_gib"] is not None else "")))
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


if __name__ == "__main__":
    sys.exit(main())
