"""`mmca bench --distributed` end to end at toy size: both sides run in fresh processes (one
alone, two gloo ranks under torchrun) and the comparison comes back as numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmca.bench import distributed
from mmca.bench.options import DistributedOptions, Workload
from mmca.errors import MmcaError

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


def test_a_side_that_fails_after_writing_its_results_keeps_them(tmp_path, monkeypatch):
    """A rank that aborts while leaving the process group (after rank 0 wrote every rank's
    figures) costs a warning, not the measurement; a side that wrote nothing is an error. The
    launcher is replaced by a stand-in: a rank aborting at teardown cannot be provoked on demand."""
    out = tmp_path / "side.json"
    opts = DistributedOptions(work=Workload(d=32, heads=4, regions=4, img_dim=8, txt_dim=12, batch=8, rank_images=12),
                              steps=1)

    def aborted_after_writing(argv, **kw):
        out.write_text(json.dumps({"ranks": 2}))
        return subprocess.CompletedProcess(argv, -6, "", "terminate called without an active exception")

    monkeypatch.setattr(distributed.subprocess, "run", aborted_after_writing)
    with pytest.warns(UserWarning, match="after writing its results"):
        assert distributed._side(opts, 2, 2, str(out)) == {"ranks": 2}
    out.unlink()
    monkeypatch.setattr(distributed.subprocess, "run",
                        lambda argv, **kw: subprocess.CompletedProcess(argv, 1, "", "boom"))
    with pytest.raises(MmcaError, match="2-process side of the benchmark failed"):
        distributed._side(opts, 2, 2, str(out))
