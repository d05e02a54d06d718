"""Folders mmca makes carry a marker naming their kind, so that a command replaces or writes
into only a folder of its own kind, never a folder a user made.

The marker is a small JSON file, `.mmca-folder.json`: `{"kind": "index", "format": 1}`.
Folders written before markers existed are recognised by their exact contents (`LEGACY_NAMES`),
and only where their signature file holds what mmca writes there.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sqlite3
import zipfile
from contextlib import closing
from fnmatch import fnmatch
from pathlib import Path

from mmca.atomic import atomic_write_text
from mmca.errors import MmcaError

MARKER = ".mmca-folder.json"
FORMAT = 1
# run: one training run; sample: `mmca sample`'s folder of two runs and a model directory;
# index: a search index; model: an exported model directory; cache: the feature cache;
# bench: `mmca bench --search`'s indexes and checkpoints.
KINDS = ("run", "sample", "index", "model", "cache", "bench")

# What each kind's folder held before markers: an unmarked folder is taken as a kind only when
# its signature file has the content mmca writes there (checked from the file's header or its
# tables), and every entry, hidden ones included, is a name (glob pattern) that kind writes.
LEGACY_NAMES: dict[str, tuple[str, ...]] = {
    "run": ("last.pt", "best.pt", "log.csv", "config.json", "curves.png", "prefix-epoch*.pt", "eval-*.json",
            ".last.pt.*.tmp", ".best.pt.*.tmp"),
    "sample": ("alpha0", "mmca", "model", "results.json"),
    "index": ("index.sqlite", "index.sqlite-*", "shards"),
    "model": ("config.json", "model.safetensors", "README.md", "eval-*.json"),
    "bench": ("random-d256.pt", "dev-*", "syn*-*", "results.json"),
}
_SQLITE_HEADER = b"SQLite format 3\x00"


def _is_torch_file(path: Path) -> bool:
    return path.is_file() and zipfile.is_zipfile(path)  # torch.save writes a zip archive


def _is_index_db(path: Path) -> bool:
    """An SQLite file holding the tables an index writes (read only; nothing is created)."""
    try:
        with path.open("rb") as f:
            if f.read(len(_SQLITE_HEADER)) != _SQLITE_HEADER:
                return False
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except (OSError, sqlite3.Error):
        return False
    return {"meta", "images", "captions"} <= tables


def _is_model_config(path: Path) -> bool:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "feature_spec" in config and "config" in config


def _legacy_signature(folder: Path, kind: str) -> bool:
    if kind == "run":
        return _is_torch_file(folder / "last.pt") or _is_torch_file(folder / "best.pt")
    if kind == "sample":
        return (folder / "results.json").is_file() and kind_of(folder / "alpha0") == "run"
    if kind == "index":
        return _is_index_db(folder / "index.sqlite")
    if kind == "model":
        return (folder / "model.safetensors").is_file() and _is_model_config(folder / "config.json")
    return _is_torch_file(folder / "random-d256.pt")  # bench


class FolderError(MmcaError):
    """A folder is not one this command may write into or replace."""


def mark(folder: str | Path, kind: str) -> Path:
    """Write `folder`'s marker (atomically); the folder is created if needed."""
    if kind not in KINDS:
        raise ValueError(f"unknown folder kind {kind!r}; one of {KINDS}")
    return atomic_write_text(Path(folder) / MARKER, json.dumps({"kind": kind, "format": FORMAT}) + "\n")


def kind_of(folder: str | Path) -> str | None:
    """The kind its marker names, the kind its contents show for an unmarked legacy folder,
    or None (not a folder mmca made, or not a folder at all)."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return None
    marker = folder / MARKER
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            return None
        return kind if kind in KINDS else None
    entries = [p.name for p in folder.iterdir()]
    for kind, patterns in LEGACY_NAMES.items():
        if all(any(fnmatch(e, pat) for pat in patterns) for e in entries) and _legacy_signature(folder, kind):
            return kind
    return None


def describe(folder: Path, limit: int = 5) -> str:
    """'a file', 'an empty folder' or 'a folder holding a.txt, b/, ... (12 entries)'."""
    if folder.is_symlink():
        return "a symbolic link"
    if not folder.is_dir():
        return "a file"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "an empty folder"
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    count = "1 entry" if len(names) == 1 else f"{len(names)} entries"
    return f"a folder holding {shown} ({count})"


def is_empty_dir(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())


def require_writable(folder: str | Path, kind: str, *, inputs: tuple[str | Path, ...] = (),
                     flag: str = "--out") -> Path:
    """Check that `folder` may become (or be replaced by) a folder of `kind`: it does not exist,
    is an empty folder, or is already a folder of that kind. It must not be the working
    directory or one of its parents, and must not be, contain or sit inside any of `inputs`.
    Raises FolderError naming what is there; returns the path, resolved."""
    path = Path(folder)
    resolved = path.resolve()
    here = Path(os.getcwd()).resolve()
    if resolved == here or resolved in here.parents:
        raise FolderError(f"{flag} {folder} is the current directory or one of its parents; it is left as it is",
                          f"give {flag} a new folder, e.g. {flag} ./{kind}")
    for given in inputs:
        source = Path(given).resolve()
        if resolved == source or resolved in source.parents or source in resolved.parents:
            raise FolderError(f"{flag} {folder} overlaps the input {given}; it is left as it is",
                              f"give {flag} a folder outside {given}")
    if not path.exists() and not path.is_symlink():
        return resolved
    if path.is_symlink() or not path.is_dir():
        raise FolderError(f"{flag} {folder} is {describe(path)}, not {_article(kind)} {kind} folder; "
                          "it is left as it is",
                          f"give {flag} a new folder")
    if is_empty_dir(path) or kind_of(path) == kind:
        return resolved
    found = kind_of(path)
    what = f"{_article(found)} {found} folder" if found else describe(path)
    raise FolderError(f"{flag} {folder} is {what}, not {_article(kind)} {kind} folder made by mmca; "
                      "it is left as it is",
                      f"give {flag} a new or empty folder")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (signal 0 checks only)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    return True


def build_sibling(folder: Path, stage: str) -> Path:
    """A hidden sibling of `folder` for a build in progress (`stage` "tmp": being written, "old":
    the folder it replaces, moved aside), named with this process's id so that a later build can
    tell a killed build's leftovers from a live one's."""
    return folder.parent / f".{folder.name}.{stage}-{os.getpid()}-{secrets.token_hex(4)}"


def sweep_leftovers(folder: Path, kind: str) -> list[Path]:
    """Remove the `build_sibling`s of `folder` whose process is gone and that are empty or carry
    `kind`'s marker: what a killed build left behind, and nothing else. Returns what was removed."""
    parent = folder.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]+")
    removed = []
    for path in parent.iterdir():
        found = pattern.fullmatch(path.name)
        if found is None or pid_alive(int(found.group(1))):
            continue
        if is_empty_dir(path) or kind_of(path) == kind:
            shutil.rmtree(path, ignore_errors=True)  # one that cannot be removed does not stop a build
            removed.append(path)
    return removed
