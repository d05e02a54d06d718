"""`mmca prepare` end to end on a small real images folder: the summary, the exit codes, and
errors printed as messages, not tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmca.cli import main


def test_prepare_builds_then_reuses(make_dataset, tmp_path: Path, snapshot) -> None:
    root, store = make_dataset(), tmp_path / "cache"
    before = snapshot(root)
    env = {**os.environ, "MMCA_CACHE_DIR": str(store), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = [sys.executable, "-m", "mmca", "prepare", str(root), "--no-progress"]
    first = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    header, row = first.stdout.splitlines()[:2]
    assert header.split()[:3] == ["split", "images", "captions"]
    assert row.split()[:6] == ["dev", "10", "50", "36", "x", "1280"]
    assert "built images+text" in row
    assert f"cache: {store.resolve()}" in first.stdout

    second = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "reused" in second.stdout.splitlines()[1]
    assert snapshot(root) == before


def test_options_reach_the_features(make_dataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dataset()
    args = ["prepare", str(root), "--splits", "dev", "--cache", str(tmp_path / "c"), "--grid", "7"]
    assert main([*args, "--max-tokens", "10", "--no-progress"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[3:6] == ["49", "x", "1280"] and row[6].endswith("/10")



def test_extract_precision_reaches_the_features(make_dataset, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dataset(2)
    assert main(["prepare", str(root), "--splits", "dev", "--cache", str(tmp_path / "c"), "--extract-precision",
                 "int8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(768) in int8" in out and "extraction precision: int8: as asked" in out

@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/dataset"], "does not exist"),
        (["{root}", "--splits", "test"], "split 'test' not found"),
        (["{root}", "--text-encoder", "{tmp}"], "has no config.json"),
        (["{root}", "--cache", "{root}/cache"], "inside the dataset folder"),
    ],
)
def test_bad_input_exits_nonzero_with_a_message(
    make_dataset, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    root = make_dataset()
    argv = ["prepare", *(a.format(root=root, tmp=tmp_path) for a in args)]
    if "--cache" not in args:
        argv += ["--cache", str(tmp_path / "c")]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "what to do:" in err


def test_help_says_where_the_cache_goes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "~/.cache/mmca" in text and "$MMCA_CACHE_DIR" in text
    assert "Nothing is ever written into DATASET_DIR" in text
