"""`train --out` (and `sample --out`) take only a new or empty folder or one of their own kind:
an exported model directory, a user's folder, the current directory and the dataset are
refused before any work and left byte for byte as they were."""

from __future__ import annotations

import pytest

import mmca
from mmca.cli import main
from mmca.export import export_model_dir
from mmca.folders import MARKER, FolderError, kind_of
from test_train import TINY, train_tiny


@pytest.fixture()
def home(tmp_path, checkpoint):
    """A dataset folder, a user's folder and an exported model directory side by side."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "captions.tsv").write_text("a.jpg\ta dog\n")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "thesis.txt").write_text("thesis\n")
    (tmp_path / "lookalike").mkdir()  # a user's folder with a run's file names, but no checkpoint
    (tmp_path / "lookalike" / "config.json").write_text('{"experiment": 3}\n')
    (tmp_path / "lookalike" / "log.csv").write_text("date,weight\n")
    export_model_dir(checkpoint, tmp_path / "model")
    return tmp_path


@pytest.mark.parametrize("command", ["train", "sample"])
@pytest.mark.parametrize("target, message", [
    ("model", "is a model folder"),  # its config.json would be overwritten: the model would not load
    ("victim", "thesis.txt"),
    ("lookalike", "config.json, log.csv"),
    ("data", "overlaps the input"),
    (".", "current directory"),
])
def test_out_that_is_not_a_run_is_refused(home, tree_digest, capsys, monkeypatch, command, target, message):
    monkeypatch.chdir(home / "victim" if target == "." else home)
    before = tree_digest(home)
    assert main([command, str(home / "data"), "--out", target]) == 2
    err = capsys.readouterr().err
    assert message in err and "left as it is" in err
    assert tree_digest(home) == before
    mmca.load(home / "model")  # still loads


def test_a_run_folder_is_marked_and_a_users_folder_refused_by_the_trainer(tmp_path):
    (tmp_path / "empty").mkdir()
    train_tiny(tmp_path / "empty", TINY.replace(epochs=1))
    assert (tmp_path / "empty" / MARKER).is_file() and kind_of(tmp_path / "empty") == "run"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine\n")
    with pytest.raises(FolderError, match="notes.txt"):
        train_tiny(tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_an_exported_model_directory_carries_its_marker(home):
    assert (home / "model" / MARKER).is_file() and kind_of(home / "model") == "model"
