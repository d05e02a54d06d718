"""The benchmark scripts that docs/benchmarks.md quotes, run at toy size, so they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from test_dist import precomp_dataset, run_mmca

REPO = Path(__file__).resolve().parents[1]


def test_train_step_profiles_and_compares_a_real_step(tmp_path):
    root, cache = tmp_path / "precomp", tmp_path / "cache"
    precomp_dataset(root, np.random.default_rng(0))
    run_mmca("train", root, "--preset", "sample", "--epochs", "2", "--cross-from-epoch", "1", "--mirror-images",
             "off", "--hidden", "16", "--heads", "2", "--batch-size", "16", "--cache", cache, "--no-progress",
             "--out", tmp_path / "run")
    out = tmp_path / "step.json"
    script = REPO / "benchmarks" / "train_step.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "run" / "last.pt"), str(root), "--cache",
                           str(cache), "--steps", "2", "--rounds", "1", "--bf16-error", "--json", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["phases"]["recomputed_pairs"] > 0 and result["ab"]["against"] == "plain"
    assert 0 <= result["bf16_error"]["max"] < result["bf16_error"]["engine_bound"]
    assert "plain step time / default step time" in done.stdout


def test_digest_benchmark_times_cold_and_warm_passes(tmp_path):
    photos = tmp_path / "images"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(bytes([i]) * 1000)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "digests.py"), str(photos)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 files" in done.stdout and "cold from disk" in done.stdout and "warm (stored digests)" in done.stdout
    assert sorted(p.name for p in photos.iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]


def test_extract_benchmark_times_each_precision_against_fp32_and_measures_drift(tmp_path, flickr8k):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "extract.py"), str(flickr8k), "--photos", "2",
                           "--captions", "4", "--drift-photos", "2", "--drift-captions", "4", "--rounds", "1",
                           "--threads", "1", "--backbones", "mobilenet_v2", "--encoders", "minilm"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MMCA_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    speed = {row["case"]: row for row in result["speed"]}
    assert speed["mobilenet_v2 fp32 1t"]["vs_fp32"] == 1.0 and speed["minilm int8 1t"]["vs_fp32"] > 0
    assert {(d["extractor"], d["precision"]) for d in result["drift"]} >= {("minilm", "int8")}
    assert all(0.9 < d["mean"] <= 1.0001 for d in result["drift"])
