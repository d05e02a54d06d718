"""Folder markers: a command may replace only a folder of its own kind."""

import os

import pytest

from mmca.folders import FolderError, kind_of, mark, require_writable


def test_marked_folder_is_its_kind(tmp_path):
    mark(tmp_path / "ix", "index")
    assert kind_of(tmp_path / "ix") == "index"
    assert require_writable(tmp_path / "ix", "index") == (tmp_path / "ix").resolve()
    with pytest.raises(FolderError, match="index folder"):
        require_writable(tmp_path / "ix", "run")


def test_legacy_folders_by_contents(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "log.csv", "prefix-epoch4.pt"):
        (run / name).write_bytes(b"x")
    assert kind_of(run) == "run"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x")
    assert kind_of(model) == "model"
    (model / "thesis.txt").write_text("mine")
    assert kind_of(model) is None  # a user's file inside: not mmca's any more


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
