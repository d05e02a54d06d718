"""One image once in an index: a folder and a file in it given to one `--add`, the same folder
added again, symbolic and hard links to one photo, and two `--add` processes of one folder
racing each other all store each photo (and each caption) once."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmca.cli import main
from mmca.search import GalleryIndex, Searcher

N_IMAGES = 20  # as in conftest.py


@pytest.fixture()
def index_copy(index_dir, tmp_path) -> Path:
    shutil.copytree(index_dir, tmp_path / "idx")
    return tmp_path / "idx"


@pytest.fixture()
def new_photos(flickr8k, tmp_path) -> Path:
    """Three dev photos the index does not hold, with a caption of one of them."""
    folder = tmp_path / "new"
    folder.mkdir()
    names = (flickr8k / "splits" / "dev.txt").read_text().split()[N_IMAGES:N_IMAGES + 3]
    for name in names:
        shutil.copy(flickr8k / "images" / name, folder / name)
    (tmp_path / "caps.tsv").write_text(f"{names[0]}\tA photo added twice .\n", encoding="utf-8")
    return folder


def assert_each_once(index: Path, photos: Path) -> None:
    idx = GalleryIndex(index)
    paths = [p for p in idx.image_paths if p]
    assert len(paths) == len(set(paths)) == N_IMAGES + 3
    assert {Path(p).name for p in paths} >= {p.name for p in photos.iterdir()}
    keys = list(zip(idx.captions, idx.caption_image.tolist()))
    assert len(keys) == len(set(keys))
    assert idx.captions.count("A photo added twice .") == 1
    assert len(Searcher(index).search_text("dog", 100)[0]) == N_IMAGES + 3


def test_a_folder_and_a_file_in_it_add_the_file_once(index_copy, new_photos, capsys):
    one = sorted(new_photos.iterdir())[0]
    caps = new_photos.parent / "caps.tsv"
    argv = ["index", "--index", str(index_copy), "--add", str(new_photos), str(one),
            str(new_photos / ".." / new_photos.name / one.name), "--captions", str(caps)]
    assert main(argv) == 0
    assert "(+3 images, +1 caption)" in capsys.readouterr().out
    assert main(argv) == 0  # again: nothing new
    assert "(+0 images, +0 captions)" in capsys.readouterr().out
    assert_each_once(index_copy, new_photos)


def test_links_to_one_photo_add_it_once(index_copy, new_photos, tmp_path, capsys):
    photo = sorted(new_photos.iterdir())[0]
    (new_photos / "z-symlink.jpg").symlink_to(photo)
    os.link(photo, new_photos / "z-hardlink.jpg")
    elsewhere = tmp_path / "elsewhere.jpg"
    elsewhere.symlink_to(photo)
    argv = ["index", "--index", str(index_copy), "--add", str(new_photos), str(elsewhere)]
    assert main(argv) == 0
    assert "(+3 images" in capsys.readouterr().out
    assert main(["index", "--index", str(index_copy), "--add", str(new_photos / "z-hardlink.jpg")]) == 0
    assert "(+0 images" in capsys.readouterr().out
    paths = [Path(p) for p in GalleryIndex(index_copy).image_paths if p]
    assert len(paths) == N_IMAGES + 3
    assert sum(p.samefile(photo) for p in paths) == 1


def _wait_for(files: list[Path], text: str, procs: list[subprocess.Popen], limit: float = 300.0) -> None:
    """Until every file shows `text` (a child got past its first look at the index), or a child ended."""
    deadline = time.monotonic() + limit
    while not all(text in f.read_text(errors="replace") for f in files):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def test_two_concurrent_adds_of_one_folder_store_each_image_once(index_copy, new_photos, tmp_path):
    caps = new_photos.parent / "caps.tsv"
    argv = [sys.executable, "-m", "mmca", "index", "--index", str(index_copy), "--add", str(new_photos),
            "--captions", str(caps)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    logs = [tmp_path / f"add-{i}.err" for i in range(2)]
    # Hold the index's write lock until both processes have read the index and started computing
    # features: each then saw none of the new photos, and only the check under the lock is left.
    lock = sqlite3.connect(index_copy / "index.sqlite", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
             for log in logs]
    try:
        _wait_for(logs, "extract images", procs)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()
    assert all("extract images" in log.read_text() for log in logs)  # both raced past the first check
    assert sorted(o.split("(+")[1].split(")")[0] for o in outs) == ["0 images, +0 captions",
                                                                    "3 images, +1 caption"]
    assert_each_once(index_copy, new_photos)
