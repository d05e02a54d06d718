"""`mmca evaluate --out` takes the path of a JSON file, new or an earlier result: a folder, a
path under a file, a link or a file mmca did not write is a clean error before any work, and is
left as it was. Without --out the result goes inside what was evaluated."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mmca.cli import main
from mmca.evaluate import default_results_path, require_results_file


@pytest.mark.parametrize("make, message", [
    (lambda home: home / "results", "is a folder; it takes the path of the JSON results file"),
    (lambda home: home / "notes.txt" / "eval.json", "is a file, not a folder"),
])
def test_out_that_cannot_be_the_results_file_is_refused(tmp_path, checkpoint, flickr8k, tree_digest, capsys,
                                                         make, message):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "old.json").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("my notes\n")
    before = tree_digest(tmp_path)
    argv = ["evaluate", str(flickr8k), "--checkpoint", str(checkpoint), "--split", "dev",
            "--cache", str(tmp_path / "cache"), "--out", str(make(tmp_path))]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("make, message", [
    (lambda home, ckpt: home / "notes.txt", "not an mmca evaluation result"),
    (lambda home, ckpt: home / "config.json", "not an mmca evaluation result"),
    (lambda home, ckpt: ckpt, "not an mmca evaluation result"),
    (lambda home, ckpt: home / "link.json", "symbolic link"),
])
def test_an_existing_file_that_is_not_a_result_is_left_as_it_is(tmp_path, checkpoint, flickr8k, tree_digest,
                                                                capsys, make, message):
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "config.json").write_text('{"mmca_version": "0", "lr": 1}\n')
    (tmp_path / "link.json").symlink_to(tmp_path / "notes.txt")
    before, ckpt_bytes = tree_digest(tmp_path), checkpoint.read_bytes()
    argv = ["evaluate", str(flickr8k), "--checkpoint", str(checkpoint), "--split", "dev",
            "--cache", str(tmp_path / "cache"), "--out", str(make(tmp_path, checkpoint))]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert tree_digest(tmp_path) == before
    assert checkpoint.read_bytes() == ckpt_bytes


def test_an_earlier_result_may_be_replaced(tmp_path):
    earlier = tmp_path / "eval.json"
    earlier.write_text(json.dumps({"mmca_version": "0.1", "protocol": "1k", "metrics": {}}))
    assert require_results_file(earlier) == earlier


def test_default_results_path_stays_inside_what_was_evaluated(tmp_path):
    result = SimpleNamespace(protocol="full", mode="exact", precision="fp32", ties="pessimistic",
                             exact_below=10, shortlist_k=None)
    for name in ("a", "b"):
        (tmp_path / "models" / name).mkdir(parents=True)
    a = default_results_path(tmp_path / "models" / "a", "dev", result)
    b = default_results_path(tmp_path / "models" / "b", "dev", result)
    assert a.parent == tmp_path / "models" / "a" and b.parent == tmp_path / "models" / "b"
    run = default_results_path(tmp_path / "run" / "best.pt", "dev", result)
    assert run == tmp_path / "run" / "eval-dev-full-exact-fp32.json"
