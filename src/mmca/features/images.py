"""Image files as inputs: which files in a folder are images, and whether a file is one by its
content, checked from its header before any feature is computed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from mmca.errors import DataError
from mmca.features.backbone import MIN_SIDE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
               "BMP": "image/bmp", "GIF": "image/gif"}  # MPO: phones' multi-picture JPEGs
IMAGE_FORMATS = tuple(IMAGE_TYPES)


def file_identity(path: Path) -> tuple[int, int]:
    """The file a path names, whatever the path: a symbolic or hard link to a file has its identity."""
    stat = Path(path).stat()
    return stat.st_dev, stat.st_ino


def unique_files(paths: Sequence[Path], known: set[tuple[int, int]] | None = None) -> list[Path]:
    """`paths` in order, each file once (the first path to name it), leaving out those in `known`
    (the identities of files already held; updated with those kept)."""
    seen = known if known is not None else set()
    kept = []
    for path in paths:
        key = file_identity(path)
        if key not in seen:
            seen.add(key)
            kept.append(path)
    return kept


def list_images(folder: Path) -> list[Path]:
    """The image files of a folder (not its subfolders), by name, each file once: a link to a
    photo the folder already holds is left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}", "pass a folder that holds .jpg/.png images")
    paths = unique_files(sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
    for p in paths:
        try:
            p.name.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{folder}: a file name is not valid UTF-8 ({p.name.encode('utf-8', 'surrogateescape')!r})",
                            "rename the file (the index stores names as text)") from None
    if not paths:
        raise DataError(f"no images (*{', *'.join(IMAGE_SUFFIXES)}) in {folder}",
                        "pass a folder that holds image files")
    return paths


def require_images(paths: Sequence[Path]) -> None:
    """Every file must be an image by its content (not its name), of a size the backbone can
    use: checked from the headers before any feature is computed."""
    for path in paths:
        try:
            with Image.open(path) as im:
                fmt, size = im.format, im.size
        except (OSError, ValueError, Image.DecompressionBombError):
            fmt, size = None, (0, 0)
        if fmt not in IMAGE_FORMATS:
            raise DataError(f"{path} is not an image ({', '.join(IMAGE_FORMATS)} expected, by content)",
                            "pass image files only")
        if min(size) < MIN_SIDE:
            raise DataError(f"{path} is {size[0]}x{size[1]} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed",
                            "pass real photos")
