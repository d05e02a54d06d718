"""`mmca evaluate --out` takes the path of a JSON file: a folder, or a path under a file, is a
clean error before any work, and is left as it was."""

from __future__ import annotations

import pytest

from mmca.cli import main


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
