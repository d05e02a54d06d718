"""The feature cache: directories of .npy arrays, each trusted only through its manifest.

An entry is built in a temporary sibling directory, its manifest written last, then renamed
into place, so a reader sees either a complete entry or none. Leftovers of killed runs are
never read and are removed by the next run that builds beside them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mmca.atomic import atomic_write_text
from mmca.errors import MmcaError
from mmca.folders import is_empty_dir, mark, pid_alive
from mmca.version import __version__

FORMAT = 1  # bump when the layout of an entry changes: older entries are then rebuilt
MANIFEST = "manifest.json"
_TEMP, _OLD = ".tmp-", ".old-"
RACY_NS = 2_000_000_000  # a file's stat is trusted for its digest only once it is this old


def default_cache_dir() -> Path:
    """$MMCA_CACHE_DIR, else $XDG_CACHE_HOME/mmca, else ~/.cache/mmca."""
    if os.environ.get("MMCA_CACHE_DIR"):
        return Path(os.environ["MMCA_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "mmca"
    return Path.home() / ".cache" / "mmca"


def digest(obj: Any) -> str:
    """sha256 of a JSON-able value, independent of dict order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def as_json(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists, paths strings), for comparing."""
    return json.loads(json.dumps(obj, default=str))


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: Path, now_ns: int) -> list[int] | None:
    """What changes when a file is rewritten, replaced or renamed over: size, mtime, ctime and
    inode (a program can restore the mtime, but not the ctime). None for a file changed in the
    last `RACY_NS`: a change within the same clock tick could keep its ctime, so its digest is
    not kept for the next check."""
    st = path.stat()
    if st.st_ctime_ns > now_ns - RACY_NS:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_digests(store: Path) -> dict[str, Any]:
    try:
        known = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) and known.get("format") == FORMAT else {}


def content_fingerprint(folder: Path, names: Iterable[str], store: Path, recheck: bool = False) -> str:
    """Identity of files by content: the sha256 of each file's bytes, read once and kept in
    `store` with the file's stat, so a warm check reads no file; a file whose stat changed
    (or every file, with `recheck`) is read again. Names and digests, in order, are hashed."""
    known = {} if recheck else _read_digests(store).get("files", {})
    files: dict[str, list[Any]] = {}
    h = hashlib.sha256()
    now = time.time_ns()
    for name in names:
        path = folder / name
        stat = _stat_key(path, now)
        old = known.get(name)
        fresh = stat is not None and isinstance(old, list) and len(old) == 2 and old[0] == stat
        sha = old[1] if fresh else file_digest(path)
        files[name] = [stat, sha]
        h.update(f"{name}\t{sha}\n".encode())
    if files != known:
        atomic_write_text(store, json.dumps({"format": FORMAT, "files": files}) + "\n")
    return h.hexdigest()


def dataset_dir(cache_dir: Path, root: Path) -> Path:
    """One cache folder per dataset root, named so a person can tell which is which."""
    root = root.resolve()
    cache_dir = cache_dir.expanduser().resolve()
    if cache_dir == root or root in cache_dir.parents:
        raise MmcaError(
            f"cache directory {cache_dir} is inside the dataset folder {root}",
            "mmca never writes into a dataset folder: choose a cache directory outside it",
        )
    claim_cache_dir(cache_dir)
    return cache_dir / f"{root.name}-{digest(str(root))[:8]}"


def claim_cache_dir(cache_dir: Path) -> None:
    """A cache folder mmca creates (or finds empty) carries the `cache` marker, so no other
    command takes it for a folder of its own; a folder with a user's files in it stays unmarked."""
    if not cache_dir.exists() or is_empty_dir(cache_dir):
        mark(cache_dir, "cache")


def load_manifest(entry: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The entry's manifest if it is complete and was built for exactly `key`, else None."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("key") != as_json(key):
        return None
    for name, meta in manifest.get("arrays", {}).items():
        try:
            array = np.load(entry / name, mmap_mode="r")
        except (OSError, ValueError):
            return None
        if list(array.shape) != meta["shape"] or str(array.dtype) != meta["dtype"]:
            return None
    return manifest


def open_array(entry: Path, name: str) -> np.ndarray:
    """A read-only memory map of one array of a validated entry."""
    return np.load(entry / name, mmap_mode="r")


def allocate_array(folder: Path, name: str, shape: tuple[int, ...], dtype: Any = np.float16) -> Path:
    """Create a zero-filled .npy file for builders to fill in place (opened with mmap_mode="r+"),
    so features never need to fit in memory, nor pass between processes."""
    path = folder / name
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
    return path


def clean_leftovers(folder: Path) -> None:
    """Remove temporary directories whose building process is gone (killed, crashed)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        marker = _TEMP if _TEMP in path.name else _OLD if _OLD in path.name else None
        if marker is None:
            continue
        pid = path.name.rsplit(marker, 1)[1].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def build_entry(entry: Path, manifest: dict[str, Any]) -> Iterator[Path]:
    """Yield a fresh temporary directory to fill; on success publish it as `entry`.

    The caller writes arrays into the directory and may add fields to `manifest` (counts,
    timings); the manifest is written last, then the directory is renamed into place. On any
    exception, KeyboardInterrupt included, the temporary directory is removed.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(entry.parent)
    tmp = entry.with_name(f"{entry.name}{_TEMP}{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    started = time.perf_counter()
    try:
        yield tmp
        manifest.setdefault("timings", {})["build_s"] = round(time.perf_counter() - started, 3)
        arrays = {p.name: np.load(p, mmap_mode="r") for p in sorted(tmp.glob("*.npy"))}
        manifest.update(
            format=FORMAT,
            mmca_version=__version__,
            created=datetime.now(timezone.utc).isoformat(),
            arrays={name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in arrays.items()},
        )
        text = json.dumps(as_json(manifest), indent=2, sort_keys=True) + "\n"
        (tmp / MANIFEST).write_text(text, encoding="utf-8")
        for path in tmp.iterdir():  # on disk before the rename makes them visible
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        _publish(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, entry: Path) -> None:
    """Rename `tmp` to `entry`, moving a stale `entry` aside first (a directory rename cannot
    overwrite a non-empty directory). If another process published the same entry meanwhile,
    its copy wins and ours is dropped by the caller."""
    old = None
    if entry.exists():
        old = entry.with_name(f"{entry.name}{_OLD}{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(entry, old)
    try:
        os.replace(tmp, entry)
    except OSError:
        if not entry.exists():
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
