"""The in-memory dataset every job reads: per image its region features, per caption its
token states and its image. Both on-disk layouts (docs/data.md) end up here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmca.data.spec import FeatureSpec


@dataclass
class SplitSource:
    """One split as read from disk, before any feature is computed.

    `image_paths` is set for the images-folder layout (features still to extract);
    `image_features` is set for the precomp layout (features shipped with the data).
    """

    root: Path
    split: str
    image_ids: list[str]
    captions: list[str]
    caption_image: np.ndarray  # (M,) int64: index into image_ids for each caption
    captions_per_image: int
    image_paths: list[Path] | None = None
    image_features: np.ndarray | None = None  # (N, k, D_img), usually a read-only memmap

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)


@dataclass
class TokenFeatures:
    """Ragged per-caption token states of the frozen text encoder.

    Caption j owns rows `offsets[j]:offsets[j+1]` of `states` (its [CLS] ... [SEP] tokens,
    no padding stored). Padding appears only when a batch is assembled, with a mask.
    """

    states: np.ndarray  # (T, D_txt), float16, usually a read-only memmap
    offsets: np.ndarray  # (M + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def dim(self) -> int:
        return int(self.states.shape[1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, index, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded token states (B, n, D_txt) and a mask (B, n), True on real tokens."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        lengths = self.lengths[index]
        n = int(lengths.max()) if len(index) else 0
        out = np.zeros((len(index), n, self.dim), dtype=self.states.dtype)  # converted by torch, below
        for row, j in enumerate(index):
            a, b = self.offsets[j], self.offsets[j + 1]
            out[row, : b - a] = self.states[a:b]
        mask = np.arange(n)[None, :] < lengths[:, None]
        return torch.from_numpy(out).to(dtype), torch.from_numpy(mask)


@dataclass
class RetrievalDataset:
    """A prepared split: what training, evaluation and search consume."""

    name: str
    split: str
    image_ids: list[str]
    captions: list[str]
    caption_image: np.ndarray  # (M,) int64
    captions_per_image: int
    image_features: np.ndarray  # (N, k, D_img)
    token_features: TokenFeatures
    image_paths: list[Path] | None = None
    # Extra training views of every image, each shaped like image_features (the mirrored photos).
    image_views: tuple[np.ndarray, ...] = ()
    # What the features were computed with (set by `prepare_split`); None: derived from shapes.
    feature_spec: FeatureSpec | None = None
    root: Path | None = None  # the dataset folder it was read from (None: built in memory)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def spec(self) -> FeatureSpec:
        """The feature spec, or one of shapes only for features of unknown provenance."""
        if self.feature_spec is not None:
            return self.feature_spec
        _, k, dim = self.image_features.shape
        return FeatureSpec.of_arrays(k, dim, self.token_features.dim)

    def image_batch(self, index, dtype: torch.dtype = torch.float32, views=None) -> torch.Tensor:
        """Region features (B, k, D_img) of the given images; `views[i]` picks image i's view
        (0 = the photo as is, v = image_views[v - 1])."""
        # gathered in the stored dtype (float16 in the cache) and converted by torch: numpy's own
        # float16 -> float32 conversion made this 5x slower, a quarter of an α = 0 training step
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if views is None:
            return torch.from_numpy(np.ascontiguousarray(self.image_features[index])).to(dtype)
        views = np.asarray(views, dtype=np.int64).reshape(-1)
        out = np.empty((len(index), *self.image_features.shape[1:]), dtype=self.image_features.dtype)
        for v, features in enumerate((self.image_features, *self.image_views)):
            rows = np.flatnonzero(views == v)  # each row read once, from its own view
            out[rows] = features[index[rows]]
        return torch.from_numpy(out).to(dtype)

    def summary(self) -> dict[str, object]:
        lengths = self.token_features.lengths
        return {
            "dataset": self.name,
            "split": self.split,
            "images": self.num_images,
            "captions": self.num_captions,
            "captions/image": self.captions_per_image,
            "regions x D_img": f"{self.image_features.shape[1]} x {self.image_features.shape[2]}",
            "tokens (mean/max) x D_txt": f"{lengths.mean():.1f}/{lengths.max()} x {self.token_features.dim}",
        }
