"""Folder markers: a command may replace only a folder of its own kind."""

import os
import sqlite3
from contextlib import closing

import pytest
import torch

from mmca.folders import FolderError, kind_of, mark, require_writable


def test_marked_folder_is_its_kind(tmp_path):
    mark(tmp_path / "ix", "index")
    assert kind_of(tmp_path / "ix") == "index"
    assert require_writable(tmp_path / "ix", "index") == (tmp_path / "ix").resolve()
    with pytest.raises(FolderError, match="index folder"):
        require_writable(tmp_path / "ix", "run")


def _index_db(path):
    with closing(sqlite3.connect(path)) as db:
        db.executescript("CREATE TABLE meta (k); CREATE TABLE images (k); CREATE TABLE captions (k);")


def test_legacy_folders_by_contents(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"epoch": 1}, run / "last.pt")
    for name in ("log.csv", "prefix-epoch4.pt", ".last.pt.1234.tmp"):
        (run / name).write_bytes(b"x")
    assert kind_of(run) == "run"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"config": {}, "feature_spec": {}}')
    (model / "model.safetensors").write_bytes(b"x")
    assert kind_of(model) == "model"
    (model / "thesis.txt").write_text("mine")
    assert kind_of(model) is None  # a user's file inside: not mmca's any more
    index = tmp_path / "index"
    index.mkdir()
    _index_db(index / "index.sqlite")
    assert kind_of(index) == "index"


@pytest.mark.parametrize("files", [
    {"config.json": "{}", "log.csv": "epoch,loss\n"},       # a run's names, but no checkpoint
    {"last.pt": "not a checkpoint", "log.csv": ""},          # a checkpoint's name, not its content
    {"index.sqlite": "my notes"},                            # an index's name, not a database
    {"config.json": '{"lr": 1}', "model.safetensors": ""},  # a model's names, not its config
])
def test_a_folder_with_mmca_names_but_not_its_contents_is_not_taken(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert kind_of(tmp_path) is None
    with pytest.raises(FolderError, match="made by mmca"):
        require_writable(tmp_path, "run")
    with pytest.raises(FolderError, match="made by mmca"):
        require_writable(tmp_path, "index")


def test_hidden_entries_count(tmp_path):
    _index_db(tmp_path / "index.sqlite")
    (tmp_path / ".thesis.tex").write_text("mine")
    assert kind_of(tmp_path) is None


def test_messages_read_right(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(FolderError, match=r"\(1 entry\), not an index folder"):
        require_writable(tmp_path, "index")


def test_a_users_folder_is_refused_and_left_as_it_is(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("thesis")
    with pytest.raises(FolderError, match="thesis.txt"):
        require_writable(victim, "index")
    assert (victim / "thesis.txt").read_text() == "thesis"
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(FolderError, match="a file"):
        require_writable(afile, "index")


def test_empty_missing_cwd_and_inputs(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    require_writable(tmp_path / "empty", "run")
    require_writable(tmp_path / "new", "run")
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(FolderError, match="current directory"):
        require_writable(".", "index")
    with pytest.raises(FolderError, match="current directory"):
        require_writable(tmp_path, "index")
    photos = tmp_path / "in" / "photos"
    photos.mkdir(parents=True)
    with pytest.raises(FolderError, match="overlaps the input"):
        require_writable(photos, "index", inputs=(photos,))
    with pytest.raises(FolderError, match="overlaps the input"):
        require_writable(photos / "ix", "index", inputs=(photos,))
    with pytest.raises(FolderError, match="overlaps the input"):
        require_writable(tmp_path / "in", "index", inputs=(photos / "a.jpg",))


def test_symlink_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(FolderError, match="symbolic link"):
        require_writable(tmp_path / "link", "index")
