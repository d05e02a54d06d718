"""The gallery index: what the engine needs per image, on disk, plus the metadata in SQLite.

Layout of an index directory::

    index.sqlite            meta (checkpoint fingerprint, backbone, text encoder, storage),
                            shards, images (id, shard, row, path, name), captions (id, text, image)
    shards/img-000000/      one .npy per ImageBank field for the images of one build or --add:
                            r, q, k, v, o (float16 or float32), i0, m, l (float32)
    shards/cap-000000/      frozen token states of the captions of one build or --add:
                            states.npy (T, D_txt) float16, offsets.npy (M + 1,)

Per image the index holds the cross unit's per-item parts of the engine (`ImageBank`): the
projected regions R, i0 and the Q/K/V and region-region softmax statistics, so a search runs
no image-side network at all; the arrays are opened memory-mapped.

Writes are atomic. A new index is built in a hidden sibling directory (`.NAME.tmp-PID-…`,
marked as an index from its first moment) and renamed into place; the next build of the same
index removes such siblings whose process is gone. An index folder carries the `index` marker
(mmca.folders), and only an index is ever replaced (`--overwrite`).
`--add` writes its shard directory under a temporary name, renames it, then registers it in
one SQLite transaction: the transaction is the commit point, and a shard directory that no
committed row names is never read (and is removed by the next writer).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mmca.checkpoint import checkpoint_identity
from mmca.data.dataset import TokenFeatures
from mmca.data.spec import ARRAYS, PRECOMP, FeatureSpec
from mmca.errors import CheckpointError, DataError, MmcaError
from mmca.features.options import FeatureOptions, FeatureRequest, extraction_options
from mmca.folders import build_sibling, kind_of, mark, require_writable, sweep_leftovers

FORMAT = "mmca-index-v1"
DB = "index.sqlite"
IMAGE_FIELDS = ("r", "i0", "q", "k", "v", "m", "l", "o")
# fields stored in the chosen storage dtype; the others always float32 (norms, softmax stats)
LOWP_FIELDS = ("r", "q", "k", "v", "o")
STORAGE = {"fp16": np.float16, "fp32": np.float32}

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE shards (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, dir TEXT NOT NULL UNIQUE,
                     first INTEGER NOT NULL, count INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE images (id INTEGER PRIMARY KEY, shard INTEGER NOT NULL REFERENCES shards(id),
                     row INTEGER NOT NULL, name TEXT NOT NULL, path TEXT);
CREATE TABLE captions (id INTEGER PRIMARY KEY, shard INTEGER NOT NULL REFERENCES shards(id),
                       row INTEGER NOT NULL, text TEXT NOT NULL, image INTEGER REFERENCES images(id));
"""


@dataclass
class ImageShard:
    id: int
    first: int
    count: int
    arrays: dict[str, np.ndarray]  # field -> (count, ...) memmap or in-memory array


@dataclass
class CaptionShard:
    id: int
    first: int
    count: int
    states: np.ndarray  # (T, D_txt)
    offsets: np.ndarray  # (count + 1,)


def _write_npy(folder: Path, name: str, array: np.ndarray) -> None:
    with open(folder / f"{name}.npy", "wb") as fh:
        np.save(fh, np.ascontiguousarray(array))
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class GalleryIndex:
    """An open index: metadata from SQLite, tensors memory-mapped from its shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        db = self.path / DB
        if not self.path.exists():
            raise DataError(f"index not found: {self.path}",
                            "build one with `mmca index --dataset ROOT --split SPLIT --checkpoint CKPT --out DIR`")
        if not db.is_file():
            raise DataError(f"{self.path} is not an mmca index (no {DB})",
                            "pass the directory written by `mmca index`, or build one there")
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                self.meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
                shards = con.execute("SELECT id, kind, dir, first, count FROM shards ORDER BY kind, first").fetchall()
                self.image_names, self.image_paths = [], []
                for name, path in con.execute("SELECT name, path FROM images ORDER BY id"):
                    self.image_names.append(name)
                    self.image_paths.append(path)
                self.captions, caption_image = [], []
                for text, image in con.execute("SELECT text, image FROM captions ORDER BY id"):
                    self.captions.append(text)
                    caption_image.append(-1 if image is None else image)
        except sqlite3.DatabaseError as err:
            raise DataError(f"cannot read index {db}: {err}",
                            "the index is damaged or not an mmca index: rebuild it with `mmca index`") from err
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{self.path} is an index of format {self.meta.get('format')!r}, not {FORMAT}",
                            "rebuild it with this version's `mmca index`")
        self.caption_image = np.asarray(caption_image, dtype=np.int64)
        self.image_shards: list[ImageShard] = []
        self.caption_shards: list[CaptionShard] = []
        for sid, kind, rel, first, count in shards:
            folder = self.path / rel
            try:
                if kind == "images":
                    arrays = {f: np.load(folder / f"{f}.npy", mmap_mode="r") for f in IMAGE_FIELDS}
                    if any(len(a) != count for a in arrays.values()):
                        raise ValueError("array lengths differ from the recorded count")
                    self.image_shards.append(ImageShard(sid, first, count, arrays))
                else:
                    offsets = np.load(folder / "offsets.npy")
                    states = np.load(folder / "states.npy", mmap_mode="r")
                    if len(offsets) != count + 1 or offsets[-1] != len(states):
                        raise ValueError("offsets do not match the states")
                    self.caption_shards.append(CaptionShard(sid, first, count, states, offsets))
            except (OSError, ValueError) as err:
                raise DataError(f"index shard {folder} is missing or damaged: {err}",
                                "rebuild the index with `mmca index`") from err
        self.num_images = len(self.image_names)
        if sum(s.count for s in self.image_shards) != self.num_images:
            raise DataError(f"index {self.path} is inconsistent (image rows and shards disagree)",
                            "rebuild the index with `mmca index`")
        self._starts = np.array([s.first for s in self.image_shards], dtype=np.int64)

    # ---- identity ----------------------------------------------------------------------
    @property
    def checkpoint(self) -> dict[str, Any]:
        return self.meta["checkpoint"]

    @property
    def gallery_roots(self) -> list[Path]:
        """The folders (or single files) the gallery's images were taken from, resolved at
        build time: the only places an image is ever served from."""
        roots = self.meta.get("gallery_roots")
        if roots is None:  # indexes built before roots were recorded: the source folder
            root = (self.meta.get("source") or {}).get("root")
            roots = [root] if root else []
        return [Path(r) for r in roots]

    def check_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Refuse a checkpoint other than the one the index was built with."""
        ident = checkpoint_identity(path)
        want = self.checkpoint
        if ident["sha256"] != want["sha256"]:
            raise CheckpointError(
                f"index {self.path} was built with checkpoint {want['path']} "
                f"(sha256 {want['sha256'][:12]}), but {ident['path']} (sha256 {ident['sha256'][:12]}) was given",
                "search with the checkpoint the index was built with, or rebuild the index with "
                "`mmca index ... --checkpoint` for this one")
        return ident

    @property
    def spec(self) -> FeatureSpec:
        """The features the index holds: with the checkpoint's identity, what identifies it.
        (Indexes that also record loose backbone and text-encoder entries are read by their spec.)"""
        raw = self.meta.get("feature_spec")
        if raw is None:
            raise CheckpointError(f"index {self.path} records no feature spec (an mmca older than feature "
                                  "specs built it): its features cannot be checked",
                                  "rebuild it with `mmca index` from the same checkpoint")
        return FeatureSpec.from_dict(raw)

    @property
    def has_photos(self) -> bool:
        """Whether its features come from photos through a backbone (not precomputed ones)."""
        return self.spec.image.source not in (PRECOMP, ARRAYS)

    def extraction_options(self, text_encoder: str | Path | None = None) -> FeatureOptions:
        """The extractors' options that compute the index's features, read from the spec it
        records and checked against it before any feature is computed (`mmca.features.options`)."""
        return extraction_options(self.spec, FeatureRequest(text_encoder=text_encoder))

    def resolve_checkpoint(self, path: str | Path | None) -> Path:
        if path is None:
            path = self.checkpoint["path"]
            if not Path(path).exists():
                raise CheckpointError(f"the index's checkpoint {path} no longer exists",
                                      "pass --checkpoint with a copy of it (same file contents)")
        self.check_checkpoint(path)
        return Path(path)

    # ---- tensors -----------------------------------------------------------------------
    @property
    def storage_bytes(self) -> int:
        return sum(a.nbytes for s in self.image_shards for a in s.arrays.values())

    def i0(self) -> torch.Tensor:
        """(N, d) float32, all images, in id order."""
        if not self.image_shards:
            return torch.zeros(0, 0)
        return torch.from_numpy(np.concatenate([np.asarray(s.arrays["i0"], dtype=np.float32)
                                                for s in self.image_shards]))

    def image_rows(self, ids: Sequence[int] | np.ndarray,
                   fields: Sequence[str] = IMAGE_FIELDS) -> dict[str, torch.Tensor]:
        """The bank fields of the given images (in the given order) as float32 tensors."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_images):
            raise IndexError("image id out of range")
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for si in np.unique(shard_of):
            shard = self.image_shards[si]
            pos = np.nonzero(shard_of == si)[0]
            rows = ids[pos] - shard.first
            order = np.argsort(rows)  # ascending reads of the memmap
            for f in fields:
                a = shard.arrays[f]
                if f not in out:
                    out[f] = np.empty((len(ids),) + a.shape[1:], dtype=np.float32)
                out[f][pos[order]] = a[rows[order]]
        return {f: torch.from_numpy(v) for f, v in out.items()}

    def all_images(self) -> dict[str, torch.Tensor]:
        return {f: torch.from_numpy(np.concatenate([np.asarray(s.arrays[f], dtype=np.float32)
                                                    for s in self.image_shards]))
                for f in IMAGE_FIELDS}

    def caption_tokens(self):
        """All captions' token states as one TokenFeatures (in caption id order)."""
        if not self.caption_shards:
            return None
        states = np.concatenate([np.asarray(s.states) for s in self.caption_shards])
        offs, base = [np.zeros(1, dtype=np.int64)], 0
        for s in self.caption_shards:
            offs.append(s.offsets[1:] + base)
            base += int(s.offsets[-1])
        return TokenFeatures(states, np.concatenate(offs))

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "images": self.num_images,
            "captions": len(self.captions),
            "checkpoint": self.checkpoint,
            "features": self.spec.describe(),
            "storage": self.meta.get("storage"),
            "shards": len(self.image_shards),
            "bytes": self.storage_bytes,
        }


# ---------------------------------------------------------------------------- writing


def require_index_out(out: str | Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """`out` may become a new index: it does not exist, is an empty folder, or is an index
    (replaced only with `overwrite`). Anything else (a user's folder or file, the working
    directory, an input, another kind of mmca folder) is refused and left as it is."""
    out = Path(out)
    require_writable(out, "index", inputs=tuple(inputs))
    if kind_of(out) == "index" and not overwrite:
        raise MmcaError(f"index {out} already exists",
                        "pass --add to append images to it, --overwrite to replace it, or another --out")


class IndexWriter:
    """Creates an index (in a temporary sibling, renamed into place on `commit`) or appends
    shards to an existing one (each registered in one SQLite transaction)."""

    def __init__(self, path: str | Path, meta: dict[str, Any] | None = None, overwrite: bool = False):
        self.final = Path(path)
        self.new = meta is not None
        if self.new:
            require_index_out(self.final, overwrite)
            self.final.parent.mkdir(parents=True, exist_ok=True)
            sweep_leftovers(self.final, "index")
            self.root = build_sibling(self.final, "tmp")
            mark(self.root, "index")  # first: a killed build leaves a folder the next one knows as its own
            (self.root / "shards").mkdir()
            self.con = sqlite3.connect(self.root / DB)
            self.con.executescript(_SCHEMA)
            self.con.executemany("INSERT INTO meta VALUES (?, ?)",
                                 [(k, json.dumps(v)) for k, v in {"format": FORMAT, **meta}.items()])
        else:
            self.root = self.final
            if not (self.root / DB).is_file():
                raise DataError(f"index not found: {self.root}", "build it first with `mmca index` (without --add)")
            self.con = sqlite3.connect(self.root / DB, timeout=30)
            self.con.execute("BEGIN IMMEDIATE")  # one writer at a time; then sweep safely
            self._sweep()
        self._pending: list[Path] = []

    def _sweep(self) -> None:
        """Remove shard directories no committed row names (leftovers of killed writers)."""
        known = {d for (d,) in self.con.execute("SELECT dir FROM shards")}
        for p in (self.root / "shards").iterdir():
            if f"shards/{p.name}" not in known:
                shutil.rmtree(p, ignore_errors=True)

    def _next(self, table: str) -> int:
        (n,) = self.con.execute(f"SELECT COALESCE(MAX(id) + 1, 0) FROM {table}").fetchone()
        return int(n)

    def _shard_dir(self, kind: str) -> tuple[int, Path, Path]:
        (sid,) = self.con.execute("SELECT COALESCE(MAX(id) + 1, 0) FROM shards").fetchone()
        name = f"{'img' if kind == 'images' else 'cap'}-{sid:06d}"
        tmp = self.root / "shards" / f".{name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir()
        return int(sid), tmp, self.root / "shards" / name

    def add_images(self, bank, names: Sequence[str], paths: Sequence[str | None]) -> list[int]:
        """Write an ImageBank's fields (cast to the index's storage dtype) as one shard."""
        n = len(names)
        if n == 0:
            return []
        storage = STORAGE[self.storage]
        sid, tmp, final = self._shard_dir("images")
        for f in IMAGE_FIELDS:
            t = getattr(bank, f).detach().cpu().float().numpy()
            if len(t) != n:
                raise ValueError(f"bank field {f} has {len(t)} rows for {n} images")
            _write_npy(tmp, f, t.astype(storage if f in LOWP_FIELDS else np.float32))
        os.replace(tmp, final)
        self._pending.append(final)
        first = self._next("images")
        self.con.execute("INSERT INTO shards VALUES (?, 'images', ?, ?, ?, ?)",
                         (sid, f"shards/{final.name}", first, n, time.time()))
        self.con.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?)",
                             [(first + i, sid, i, names[i], None if paths[i] is None else str(paths[i]))
                              for i in range(n)])
        return list(range(first, first + n))

    def add_captions(self, tokens, texts: Sequence[str], images: Sequence[int | None]) -> None:
        """Write captions' frozen token states (a TokenFeatures) as one shard."""
        m = len(texts)
        if m == 0:
            return
        sid, tmp, final = self._shard_dir("captions")
        _write_npy(tmp, "states", np.asarray(tokens.states, dtype=np.float16))
        _write_npy(tmp, "offsets", np.asarray(tokens.offsets, dtype=np.int64))
        os.replace(tmp, final)
        self._pending.append(final)
        first = self._next("captions")
        self.con.execute("INSERT INTO shards VALUES (?, 'captions', ?, ?, ?, ?)",
                         (sid, f"shards/{final.name}", first, m, time.time()))
        self.con.executemany("INSERT INTO captions VALUES (?, ?, ?, ?, ?)",
                             [(first + i, sid, i, texts[i], images[i]) for i in range(m)])

    @property
    def storage(self) -> str:
        (v,) = self.con.execute("SELECT value FROM meta WHERE key = 'storage'").fetchone()
        return json.loads(v)

    # what the index holds now, as this writer sees it: read under its lock, current to the commit
    def image_paths(self) -> set[str]:
        return {p for (p,) in self.con.execute("SELECT path FROM images WHERE path IS NOT NULL")}

    def image_names(self) -> list[str]:
        return [n for (n,) in self.con.execute("SELECT name FROM images ORDER BY id")]

    def caption_keys(self) -> set[tuple[str, int]]:
        """(text, image id or -1) of every caption."""
        return set(self.con.execute("SELECT text, COALESCE(image, -1) FROM captions"))

    def add_gallery_roots(self, roots: Sequence[Path]) -> None:
        """Record more places images may be served from (in this writer's transaction)."""
        row = self.con.execute("SELECT value FROM meta WHERE key = 'gallery_roots'").fetchone()
        if row:
            have = json.loads(row[0])
        else:  # an index from before roots were recorded: its source folder first
            src = self.con.execute("SELECT value FROM meta WHERE key = 'source'").fetchone()
            root = (json.loads(src[0]) or {}).get("root") if src else None
            have = [root] if root else []
        merged = have + [str(r) for r in roots if str(r) not in have]
        self.con.execute("INSERT OR REPLACE INTO meta VALUES ('gallery_roots', ?)", (json.dumps(merged),))

    def commit(self) -> Path:
        _fsync_dir(self.root / "shards")
        self.con.commit()
        self.con.close()
        if self.new:
            old = None
            if self.final.exists():  # --overwrite: checked again, then the old one moved aside and swapped
                require_writable(self.final, "index")
                old = build_sibling(self.final, "old")
                os.replace(self.final, old)
            os.replace(self.root, self.final)
            _fsync_dir(self.final.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        try:
            self.con.rollback()
            self.con.close()
        except sqlite3.Error:
            pass
        if self.new:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            for p in self._pending:
                shutil.rmtree(p, ignore_errors=True)

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
