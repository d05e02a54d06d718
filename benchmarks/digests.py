"""What identifying photos by content costs the feature cache (docs/data.md, "The feature cache").

Times `cache.content_fingerprint` over every file of an images folder three ways:
cold from disk (each file first dropped from the page cache with posix_fadvise DONTNEED, no
stored digests), cold from memory (no stored digests, files in the page cache), and warm (the
digests stored by the previous pass: one stat per file, no file read).

    python benchmarks/digests.py IMAGES_DIR
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from mmca.features.cache import content_fingerprint
from mmca.hardware import cpu_model_name


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed_pass(folder: Path, names: list[str], store: Path) -> float:
    started = time.perf_counter()
    content_fingerprint(folder, names, store)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/digests.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=Path, metavar="IMAGES_DIR", help="a folder of photos, e.g. DATASET_DIR/images")
    args = parser.parse_args()
    names = sorted(p.name for p in args.images.iterdir() if p.is_file())
    size = sum((args.images / n).stat().st_size for n in names)
    with tempfile.TemporaryDirectory(prefix="mmca-digests-") as tmp:
        store = Path(tmp) / "digests.json"
        for name in names:
            drop_from_page_cache(args.images / name)
        disk = timed_pass(args.images, names, store)
        store.unlink()
        memory = timed_pass(args.images, names, store)
        warm = timed_pass(args.images, names, store)
    print(f"{len(names)} files, {size / 2**20:.0f} MiB, {cpu_model_name()}")
    print(f"cold from disk {disk:.2f} s ({size / 2**20 / disk:.0f} MiB/s), cold from memory {memory:.2f} s "
          f"({size / 2**20 / memory:.0f} MiB/s), warm (stored digests) {warm:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
