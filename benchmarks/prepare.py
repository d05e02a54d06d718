"""Feature preparation benchmark (docs/benchmarks.md, "Preparing features").

Runs the real command twice: `mmca prepare DATASET --force` (cold: every feature computed)
then `mmca prepare DATASET` (warm: the cache is verified and memory-mapped), and prints both
wall times, process start-up included, and their ratio.

    python benchmarks/prepare.py [DATASET_DIR] [--cache DIR]

Without --cache the features go to a fresh temporary directory, deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall time of one command, and what it printed; progress bars pass through to stderr."""
    started = time.perf_counter()
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"{' '.join(command)} exited with {result.returncode}")
    return elapsed, result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/prepare.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, nargs="?", default=DEFAULT_DATASET, metavar="DATASET_DIR")
    parser.add_argument("--cache", type=Path, metavar="DIR", help="keep the features here (default: a temporary dir)")
    args = parser.parse_args()

    cache = args.cache or Path(tempfile.mkdtemp(prefix="mmca-bench-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "mmca", "prepare", str(args.dataset), "--cache", str(cache)]
    try:
        cold, cold_out = timed([*command, "--force"], env)
        warm, warm_out = timed(command, env)
        size = sum(p.stat().st_size for p in cache.rglob("*.npy"))
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"cold run:\n{cold_out}\nwarm run:\n{warm_out}")
    print(f"machine: {os.cpu_count()} CPUs, torch threads {_torch_threads()}")
    print(f"cache size {size / 2**30:.2f} GiB")
    print(f"cold {cold:.1f} s, warm {warm:.2f} s, ratio {cold / warm:.0f}x")
    return 0


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
