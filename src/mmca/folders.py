"""Folders mmca makes carry a marker naming their kind, so that a command replaces or writes
into only a folder of its own kind, never a folder a user made.

The marker is a small JSON file, `.mmca-folder.json`: `{"kind": "index", "format": 1}`.
Folders written before markers existed are recognised by their exact contents (`LEGACY`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
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

# What each kind's folder held before markers: an unmarked folder is taken as a kind when it
# holds one of that kind's signature files and nothing but the names (glob patterns) it writes.
LEGACY: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "run": (("last.pt", "best.pt", "log.csv"),
            ("last.pt", "best.pt", "log.csv", "config.json", "curves.png", "prefix-epoch*.pt", "eval-*.json")),
    "sample": (("results.json", "alpha0"), ("alpha0", "mmca", "model", "results.json")),
    "index": (("index.sqlite",), ("index.sqlite", "index.sqlite-*", "shards")),
    "model": (("model.safetensors",), ("config.json", "model.safetensors", "README.md")),
    "bench": (("random-d256.pt",), ("random-d256.pt", "dev-*", "syn*-*", "results.json")),
}


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
    entries = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    for kind, (signatures, patterns) in LEGACY.items():
        if (any(name in entries for name in signatures)
                and all(any(fnmatch(e, pat) for pat in patterns) for e in entries)):
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
    return f"a folder holding {shown} ({len(names)} entries)"


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
        raise FolderError(f"{flag} {folder} is {describe(path)}, not a {kind} folder; it is left as it is",
                          f"give {flag} a new folder")
    if is_empty_dir(path) or kind_of(path) == kind:
        return resolved
    found = kind_of(path)
    what = f"a {found} folder" if found else describe(path)
    raise FolderError(f"{flag} {folder} is {what}, not a {kind} folder made by mmca; it is left as it is",
                      f"give {flag} a new or empty folder")


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
