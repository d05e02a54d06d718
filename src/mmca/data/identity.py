"""What a split holds, in a few fields a run records: resuming a run on other data would mix
two datasets in one model and one log without any error, so `--resume` compares them first."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mmca.data.dataset import RetrievalDataset


@dataclass(frozen=True)
class SplitIdentity:
    root: str | None  # the dataset folder, resolved (None: built in memory)
    split: str
    images: int
    captions: int
    digest: str  # sha256 of the image list, the captions and which image each caption describes

    @classmethod
    def of(cls, dataset: RetrievalDataset) -> "SplitIdentity":
        return cls(root=str(dataset.root.resolve()) if dataset.root is not None else None, split=dataset.split,
                   images=dataset.num_images, captions=dataset.num_captions, digest=content_digest(dataset))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> "SplitIdentity | None":
        """None for a record this version cannot read (absent, or written by other code)."""
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            return None
        return cls(**raw)

    def differences(self, other: "SplitIdentity") -> list[str]:
        """'root: '/a' vs '/b'; captions: 120 vs 60'-style lines, or [] when both hold the same
        content: a dataset that was moved or copied is the same data, its root alone differs."""
        if self.digest == other.digest:
            return []
        return [f"{f.name}: {_shown(f.name, getattr(self, f.name))} vs {_shown(f.name, getattr(other, f.name))}"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def content_digest(dataset: RetrievalDataset) -> str:
    """Order matters: a caption moved to another image is another dataset."""
    content = {"image_ids": dataset.image_ids, "captions": dataset.captions,
               "caption_image": [int(i) for i in dataset.caption_image]}
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()


def _shown(name: str, value: Any) -> str:
    """A value for a message; a digest cut to its first 12 characters."""
    return repr(f"{value[:12]}…") if name == "digest" else repr(value)


def shared_images(a: RetrievalDataset, b: RetrievalDataset) -> int:
    """How many images two splits both hold: the same photo file (the images-folder layout,
    paths resolved) or the same image id (a precomp layout's `{split}_ids.txt`). Splits whose
    ids are only their row numbers share no identity to compare: 0."""
    return len(_image_keys(a) & _image_keys(b))


def _image_keys(dataset: RetrievalDataset) -> set[str]:
    if dataset.image_paths is not None:
        return {str(Path(p).resolve()) for p in dataset.image_paths}
    if dataset.image_ids == [str(i) for i in range(dataset.num_images)]:  # row numbers, not identities
        return set()
    return set(dataset.image_ids)
