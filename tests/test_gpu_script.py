"""benchmarks/gpu.sh, the run prepared for a GPU machine, at toy size on the CPU (--cpu-smoke):
every step it would run on the GPU runs here too, so the script is tested without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_every_step_at_toy_size(tmp_path, precomp_captions):
    env = {**os.environ, "PYTHON": sys.executable, "MMCA_SHARED_DATA": str(precomp_captions.parent)}
    done = subprocess.run([str(REPO / "benchmarks" / "gpu.sh"), "--cpu-smoke", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"bench", "ranks_8", "ranks_16", "epoch_1", "epoch_2"}
    assert all(r["status"] == "ok" for r in results.values()), results
    assert results["ranks_16"]["exact_ranks_identical"]
    assert results["epoch_2"]["ranks"] == 2 and results["epoch_1"]["captions"] == 240
    for line in ("scoring pairs/s", "16 x 80 exact", "epoch, 2 rank(s)"):
        assert line in done.stdout


def test_without_a_gpu_the_full_run_says_what_to_do():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py")], capture_output=True, text=True)
    assert done.returncode == 2 and "--cpu-smoke" in done.stderr
