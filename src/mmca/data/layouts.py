"""Read the two on-disk layouts (docs/data.md) into a `SplitSource`, validating as we go.

Every check raises a `DataError` naming the file (and line or image) and saying what to do,
because a bad dataset found here costs seconds, found during feature extraction it costs hours.
Nothing is ever written into the dataset folder, and images are never opened here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NoReturn

import numpy as np

from mmca.data.dataset import SplitSource
from mmca.errors import DataError

IMAGES, PRECOMP = "images", "precomp"
_CAPS, _IMS, _IDS = "_caps.txt", "_ims.npy", "_ids.txt"
_IMAGES_LAYOUT = "images/, captions.tsv (filename<TAB>caption per line) and splits/NAME.txt"
_PRECOMP_LAYOUT = "{split}_ims.npy (N x k x D_img) and {split}_caps.txt (captions, in image order)"
_SHOWN = 5  # problems listed in one message; the rest are counted
_CHUNK_BYTES = 64 << 20  # memory bound of the NaN/Inf scan
_IM_DIV_SAMPLES = 8  # groups of repeated rows compared to confirm im_div


def detect_layout(root: Path) -> str:
    """Tell which layout `root` holds, so callers never guess from file names themselves."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist", hint="pass the folder that holds the dataset")
    has_images = any((root / name).exists() for name in ("captions.tsv", "splits", "images"))
    has_precomp = any(root.glob(f"*{_CAPS}")) or any(root.glob(f"*{_IMS}"))
    if has_images and has_precomp:
        raise DataError(
            f"{root} holds files of both layouts",
            hint=f"keep one layout per folder: either {_IMAGES_LAYOUT}, or {_PRECOMP_LAYOUT}",
        )
    if has_images:
        return IMAGES
    if has_precomp:
        return PRECOMP
    raise DataError(
        f"{root} is not a dataset folder: found neither the images-folder nor the precomp layout",
        hint=f"expected either {_IMAGES_LAYOUT}, or {_PRECOMP_LAYOUT}",
    )


def list_splits(root: Path) -> list[str]:
    """Names of the splits present, sorted (images: splits/*.txt; precomp: *_caps.txt)."""
    root = Path(root)
    return _splits(root, detect_layout(root))


def read_split(root: Path, split: str, captions_per_image: int | None = 5) -> SplitSource:
    """Read and validate one split of either layout.

    `captions_per_image` is checked (the protocol assumes 5); `None` accepts any count that is
    the same for every image.
    """
    if captions_per_image is not None and captions_per_image < 1:
        raise ValueError(f"captions_per_image must be a positive int or None, not {captions_per_image!r}")
    root = Path(root).resolve()
    layout = detect_layout(root)
    available = _splits(root, layout)
    if split not in available:
        where = f"splits/{split}.txt" if layout == IMAGES else f"{split}{_CAPS} and {split}{_IMS}"
        raise DataError(
            f"split {split!r} not found in {root}; available: {', '.join(available) or 'none'}",
            hint=f"choose one of the available splits, or add {where}",
        )
    if layout == IMAGES:
        return _read_images_split(root, split, captions_per_image)
    return _read_precomp_split(root, split, captions_per_image)


# ---------------------------------------------------------------------------- shared helpers


def _splits(root: Path, layout: str) -> list[str]:
    if layout == IMAGES:
        return sorted(p.stem for p in (root / "splits").glob("*.txt"))
    return sorted(p.name.removesuffix(_CAPS) for p in root.glob(f"*{_CAPS}"))


def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, trailing blank lines dropped (line i+1 is index i).

    Splits on '\\n' only, unlike str.splitlines, so that a stray form feed or U+2028 inside a
    caption cannot shift every later caption onto the wrong image.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8", hint="save the file as UTF-8") from None
    lines = [line.rstrip("\r") for line in text.removeprefix("\ufeff").split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _fail(where: str, problems: list[str], hint: str) -> NoReturn:
    """Raise one error listing the first few problems and counting the rest."""
    listed = "\n    ".join(problems[:_SHOWN])
    more = f"\n    ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    raise DataError(f"{where}: {len(problems)} problem(s):\n    {listed}{more}", hint=hint)


def _cpi_hint(found: int) -> str:
    return (
        f"if the dataset really has {found} captions per image, pass captions_per_image={found} "
        f"(CLI: --captions-per-image {found})"
    )


# ---------------------------------------------------------------------------- images folder


def _read_images_split(root: Path, split: str, cpi: int | None) -> SplitSource:
    captions = _read_captions_tsv(root / "captions.tsv")
    split_path = root / "splits" / f"{split}.txt"
    names = _read_split_file(split_path)
    _check_split_images(root, split_path, names, captions)
    cpi = _check_image_counts(root / "captions.tsv", split, [(n, captions[n]) for n, _ in names], cpi)
    flat = [text for name, _ in names for _, text in captions[name]]
    return SplitSource(
        root=root,
        split=split,
        image_ids=[name for name, _ in names],
        captions=flat,
        caption_image=np.repeat(np.arange(len(names), dtype=np.int64), cpi),
        captions_per_image=cpi,
        image_paths=[root / "images" / name for name, _ in names],
    )


def _read_captions_tsv(path: Path) -> dict[str, list[tuple[int, str]]]:
    """Captions of every image as (line number, caption), in file order."""
    if not path.is_file():
        raise DataError(f"{path} not found", hint=f"an images-folder dataset needs {_IMAGES_LAYOUT}")
    captions: dict[str, list[tuple[int, str]]] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        name, tab, text = line.partition("\t")
        if not tab or not name.strip():
            raise DataError(
                f"{path}, line {number}: expected 'filename<TAB>caption', found {line[:80]!r}",
                hint="separate the image filename from its caption with one tab character",
            )
        if not text.strip():
            raise DataError(
                f"{path}, line {number}: empty caption for {name.strip()}",
                hint="write the caption after the tab, or delete the line",
            )
        captions.setdefault(name.strip(), []).append((number, text.strip()))
    return captions


def _read_split_file(path: Path) -> list[tuple[str, int]]:
    """Filenames of a split as (filename, line number); duplicates are an error."""
    names = [(line.strip(), n) for n, line in enumerate(_read_lines(path), start=1) if line.strip()]
    first: dict[str, int] = {}
    duplicates = []
    for name, number in names:
        if name in first:
            duplicates.append(f"line {number}: {name} already listed on line {first[name]}")
        first.setdefault(name, number)
    if duplicates:
        _fail(f"{path}", duplicates, hint="list each image once per split; delete the repeated lines")
    if not names:
        raise DataError(f"{path} lists no images", hint="write one image filename per line")
    return names


def _check_split_images(
    root: Path, split_path: Path, names: list[tuple[str, int]], captions: dict[str, list[tuple[int, str]]]
) -> None:
    """Every image of the split must exist under images/ and have captions (checked, not opened)."""
    problems = []
    for name, number in names:
        if not (root / "images" / name).is_file():
            problems.append(f"line {number}: {name} not found in images/")
        if name not in captions:
            problems.append(f"line {number}: {name} has no caption in captions.tsv")
    if problems:
        _fail(
            f"{split_path}",
            problems,
            hint="fix the filenames, add the missing images to images/ and their captions to "
            "captions.tsv, or remove those lines from the split file",
        )


def _check_image_counts(
    tsv: Path, split: str, per_image: list[tuple[str, list[tuple[int, str]]]], cpi: int | None
) -> int:
    """Return the (uniform) captions-per-image count of the split, or name the first bad image."""
    counts = Counter(len(caps) for _, caps in per_image)
    if cpi is None and len(counts) == 1:
        return next(iter(counts))
    if cpi is not None and set(counts) == {cpi}:
        return cpi
    if len(counts) == 1:
        (found,) = counts
        raise DataError(
            f"{tsv}: every image of split {split!r} has {found} captions, expected {cpi}",
            hint=_cpi_hint(found),
        )
    expected = cpi if cpi is not None else counts.most_common(1)[0][0]
    name, caps = next((n, c) for n, c in per_image if len(c) != expected)
    lines = ", ".join(str(number) for number, _ in caps)
    if cpi is None:
        raise DataError(
            f"{tsv}: image {name} has {len(caps)} captions (lines {lines}), while most images of "
            f"split {split!r} have {expected}",
            hint="every image needs the same number of captions: add or remove captions of that image",
        )
    raise DataError(
        f"{tsv}: image {name} has {len(caps)} captions (lines {lines}), expected {cpi}",
        hint=f"give every image exactly {cpi} captions; {_cpi_hint(len(caps))}",
    )


# ---------------------------------------------------------------------------- precomp


def _read_precomp_split(root: Path, split: str, cpi: int | None) -> SplitSource:
    ims_path, caps_path = root / f"{split}{_IMS}", root / f"{split}{_CAPS}"
    rows = _load_features(ims_path)
    captions = _read_precomp_captions(caps_path)
    cpi, im_div = _precomp_captions_per_image(ims_path, caps_path, rows, len(captions), cpi)
    features = rows[::cpi] if im_div else rows  # strided view of the memmap: no copy
    _check_finite(ims_path, features, stride=cpi if im_div else 1)
    n = len(features)
    ids_path = root / f"{split}{_IDS}"
    ids = _read_precomp_ids(ids_path, n, cpi) if ids_path.is_file() else [str(i) for i in range(n)]
    return SplitSource(
        root=root,
        split=split,
        image_ids=ids,
        captions=captions,
        caption_image=np.repeat(np.arange(n, dtype=np.int64), cpi),
        captions_per_image=cpi,
        image_features=features,
    )


def _load_features(path: Path) -> np.ndarray:
    """Memory-map the region features and check their shape and dtype (not their values)."""
    if not path.is_file():
        raise DataError(
            f"{path} not found",
            hint=f"a precomp split needs its region features in {path.name} (N x k x D_img), next to "
            f"{path.name.removesuffix(_IMS)}{_CAPS}",
        )
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY":
        raise DataError(f"{path} is not a .npy file (it lacks numpy's header)",
                        hint="save the region features with numpy.save as an N x k x D_img float array")
    try:
        rows = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        # numpy's message may suggest allow_pickle=True: never repeat unsafe advice
        reason = "it holds Python objects, which are never unpickled" if "pickle" in str(exc) else str(exc)
        raise DataError(f"{path}: not a readable .npy array ({reason})",
                        hint="save a plain float array with numpy.save") from None
    if rows.ndim != 3:
        raise DataError(
            f"{path}: features have shape {rows.shape} ({rows.ndim}-D), expected N x k x D_img "
            "(images x regions x feature dimension)",
            hint="store one (k, D_img) block of region features per image; a single pooled vector "
            "per image can be saved as (N, 1, D_img)",
        )
    if not np.issubdtype(rows.dtype, np.floating):
        raise DataError(f"{path}: dtype {rows.dtype}, expected a float type", hint="save as float32 or float16")
    if len(rows) == 0:
        raise DataError(f"{path} holds no images", hint="check that the file belongs to this split")
    return rows


def _read_precomp_captions(path: Path) -> list[str]:
    """One caption per line; position is identity here, so a blank line is an error."""
    captions = [line.strip() for line in _read_lines(path)]
    empty = next((i for i, text in enumerate(captions) if not text), None)
    if empty is not None:
        raise DataError(
            f"{path}, line {empty + 1}: empty caption",
            hint="every line is one caption, in image order: restore the missing caption",
        )
    return captions


def _precomp_captions_per_image(
    ims_path: Path, caps_path: Path, rows: np.ndarray, n_captions: int, cpi: int | None
) -> tuple[int, bool]:
    """Captions per image, and whether each image row is repeated once per caption (im_div)."""
    n_rows = len(rows)
    guess = cpi if cpi is not None else 5  # the convention of the releases that repeat rows
    if n_rows == n_captions and guess > 1 and _rows_repeat(rows, guess):
        return guess, True
    if cpi is None and n_captions % n_rows == 0:
        return n_captions // n_rows, False
    if cpi is not None and n_captions == n_rows * cpi:
        return cpi, False
    expected = f", {n_rows} x {cpi} = {n_rows * cpi} expected" if cpi is not None else ""
    uniform = n_captions % n_rows == 0
    raise DataError(
        f"{caps_path}: {n_captions} captions for the {n_rows} images of {ims_path.name}{expected}",
        hint=_cpi_hint(n_captions // n_rows)
        if uniform
        else "each image needs the same number of consecutive caption lines; check that both files "
        "belong to the same split",
    )


def _rows_repeat(rows: np.ndarray, group: int) -> bool:
    """Whether rows group*i .. group*i+group-1 are identical, on a sample of groups."""
    groups = len(rows) // group
    if groups == 0 or len(rows) % group:
        return False
    for g in np.unique(np.linspace(0, groups - 1, num=min(groups, _IM_DIV_SAMPLES)).astype(np.int64)):
        block = np.asarray(rows[g * group : (g + 1) * group])
        if not all(np.array_equal(row, block[0], equal_nan=True) for row in block[1:]):
            return False
    return True


# Files already scanned in this process, by (path, size, mtime): a job that reads a split
# twice (or a train and a dev split that share a file) scans it once.
_SCANNED: set[tuple[str, int, int, int]] = set()


def _check_finite(path: Path, features: np.ndarray, stride: int) -> None:
    """Scan for NaN/Inf in chunks, so a multi-GB memmap never lands in memory at once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, stride)
    if key in _SCANNED:
        return
    _scan_finite(path, features, stride)
    _SCANNED.add(key)


def _scan_finite(path: Path, features: np.ndarray, stride: int) -> None:
    step = max(1, _CHUNK_BYTES // max(1, features[0].nbytes))
    for start in range(0, len(features), step):
        chunk = np.asarray(features[start : start + step])
        finite = np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
        if not finite.all():
            index = start + int(np.argmin(finite))
            kind = "NaN" if np.isnan(chunk[index - start]).any() else "Inf"
            row = f" (row {index * stride})" if stride > 1 else ""
            raise DataError(
                f"{path}: image {index}{row} has {kind} values in its features",
                hint="recompute the features of that image, or remove it and its captions",
            )


def _read_precomp_ids(path: Path, n_images: int, cpi: int) -> list[str]:
    """Image ids, given one per image or one per caption row (then constant within an image)."""
    ids = [line.strip() for line in _read_lines(path)]
    if len(ids) not in (n_images, n_images * cpi):
        raise DataError(
            f"{path}: {len(ids)} ids, expected one per image ({n_images}) or one per caption ({n_images * cpi})",
            hint="check that the ids file belongs to this split",
        )
    empty = next((i for i, x in enumerate(ids) if not x), None)
    if empty is not None:
        raise DataError(f"{path}, line {empty + 1}: empty id", hint="write one id per line")
    if len(ids) == n_images:
        return ids
    bad = next((i for i, x in enumerate(ids) if x != ids[i - i % cpi]), None)
    if bad is not None:
        raise DataError(
            f"{path}, line {bad + 1}: id {ids[bad]!r} differs from {ids[bad - bad % cpi]!r} on line "
            f"{bad - bad % cpi + 1}, but both lines belong to image {bad // cpi}",
            hint=f"with one id per caption, each run of {cpi} lines must repeat the same image id",
        )
    return ids[::cpi]
