"""`mmca index --out` writes only what it owns: a folder that is not an index, a file, the
current directory and the input folder are refused and left byte for byte as they were;
--overwrite replaces an index only; a killed build's temporary folder is swept by the next."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmca.cli import main
from mmca.export import export_model_dir
from mmca.folders import kind_of
from mmca.search import GalleryIndex

N_IMAGES = 20  # as in conftest.py


@pytest.fixture()
def home(tmp_path, gallery) -> Path:
    """A user's folder holding a copy of the photos and a thesis."""
    (tmp_path / "photos").mkdir()
    for photo in sorted(gallery.glob("*.jpg"))[:3]:
        shutil.copy(photo, tmp_path / "photos" / photo.name)
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "thesis.txt").write_text("thesis\n")
    (tmp_path / "notes.txt").write_text("my notes\n")
    return tmp_path


def index_argv(checkpoint: Path, images: Path, out: Path | str, *extra: str) -> list[str]:
    return ["index", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), *extra]


@pytest.mark.parametrize("target, message", [
    ("victim", "thesis.txt"),  # a folder of the user's
    ("photos", "overlaps the input"),  # the very --images folder
    ("notes.txt", "is a file"),  # a plain file must not become a hidden .notes.txt.old-...
])
def test_overwrite_refuses_what_is_not_an_index(home, checkpoint, tree_digest, capsys, target, message):
    before = tree_digest(home)
    assert main(index_argv(checkpoint, home / "photos", home / target, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert message in err and "left as it is" in err
    assert tree_digest(home) == before


def test_out_dot_is_refused_and_leaves_no_temporary_folder(home, checkpoint, tree_digest, capsys, monkeypatch):
    monkeypatch.chdir(home / "victim")
    before = tree_digest(home)
    assert main(index_argv(checkpoint, home / "photos", ".", "--overwrite")) == 2
    assert "current directory" in capsys.readouterr().err
    assert tree_digest(home) == before


def test_overwrite_refuses_a_model_directory(home, checkpoint, tree_digest, capsys):
    model = export_model_dir(checkpoint, home / "model")
    before = tree_digest(home)
    assert main(index_argv(checkpoint, home / "photos", model, "--overwrite")) == 2
    assert "a model folder" in capsys.readouterr().err
    assert tree_digest(home) == before


KILLED_BUILD = """
import os, signal, sys
from mmca.search.index import IndexWriter
writer = IndexWriter(sys.argv[1], {"storage": "fp16"})
print(writer.root, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # killed mid-build: the temporary folder stays
"""


def test_killed_build_is_swept_and_overwrite_replaces_an_index(home, checkpoint, tree_digest, capsys):
    out = home / "ix"
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(out)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert killed.returncode == -9, killed.stderr
    leftover = Path(killed.stdout.strip())
    assert leftover.parent == home and leftover.name.startswith(".ix.tmp-") and kind_of(leftover) == "index"
    # a live build's folder (this process) and a look-alike without the marker are not touched
    live = home / f".ix.tmp-{os.getpid()}-00000000"
    alike = home / ".ix.tmp-999999999-00000000"
    for folder in (live, alike):
        folder.mkdir()
        (folder / "keep.txt").write_text("not a killed build's\n")

    assert main(index_argv(checkpoint, home / "photos", out)) == 0
    assert not leftover.exists() and live.exists() and alike.exists()
    assert kind_of(out) == "index" and GalleryIndex(out).num_images == 3

    assert main(index_argv(checkpoint, home / "photos", out)) == 2  # an index, but no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(index_argv(checkpoint, home / "photos", out, "--overwrite")) == 0
    assert GalleryIndex(out).num_images == 3
    hidden = sorted(p.name for p in home.iterdir() if p.name.startswith(".ix."))
    assert hidden == sorted([live.name, alike.name])  # no .ix.old-... or .ix.tmp-... of ours is left
