"""`mmca bench --distributed` end to end at toy size: both sides run in fresh processes (one
alone, two gloo ranks under torchrun) and the comparison comes back as numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

TOY = ["--hidden", "32", "--heads", "4", "--batch", "8", "--rank-images", "12", "--steps", "1", "--img-dim", "8",
       "--regions", "4", "--txt-dim", "12", "--device", "cpu"]


def bench(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "mmca", "bench", *argv], env=env, capture_output=True, text=True,
                          timeout=300)


def test_distributed_bench_compares_two_ranks_with_one_process(tmp_path):
    out = tmp_path / "dist.json"
    done = bench("--distributed", "--ranks", "2", "--threads", "2", *TOY, "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training step" in done.stdout and "in collectives" in done.stdout
    result = json.loads(out.read_text())
    one, two = result["one_process"], result["ranks"]
    assert (one["ranks"], one["threads_per_rank"], two["ranks"], two["threads_per_rank"]) == (1, 2, 2, 1)
    assert two["backend"] == "gloo" and one["backend"] is None
    for part in ("train_step", "evaluation"):
        assert one[part]["seconds"] > 0 and two[part]["seconds"] > 0
        assert one[part]["collective_seconds_per_rank"] == [0.0]  # one process calls no collective
        assert len(two[part]["collective_seconds_per_rank"]) == 2
    # the same work on both sides: the same global batch's loss, the same exact metrics
    assert abs(one["train_step"]["loss"] - two["train_step"]["loss"]) < 1e-4
    assert one["evaluation"]["rsum"] == two["evaluation"]["rsum"]


def test_distributed_bench_refuses_ranks_that_cannot_share_the_threads():
    done = bench("--distributed", "--ranks", "3", "--threads", "2", *TOY)
    assert done.returncode == 2 and "share the threads evenly" in done.stderr
