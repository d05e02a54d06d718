"""The benchmark's inputs: random region features and token states generated per batch
(nothing big held in memory), a random gallery, and the device sync a timing needs."""

from __future__ import annotations

import numpy as np
import torch

from mmca.data.dataset import RetrievalDataset, TokenFeatures


class RandomImages:
    """Random region features generated per index (nothing big held in memory)."""

    def __init__(self, n: int, k: int, dim: int, seed: int = 0):
        self.num_images, self.k, self.dim, self.seed = n, k, dim, seed

    def image_batch(self, index) -> torch.Tensor:
        index = np.asarray(index).reshape(-1)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index[0]))
        return torch.randn(len(index), self.k, self.dim, generator=g)


class RandomTokens:
    """Random token states with a realistic caption-length spread (mean ~16 WordPiece tokens
    including [CLS]/[SEP], 8..40), generated per batch."""

    def __init__(self, m: int, dim: int, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.lengths = np.clip(np.round(rng.gamma(9.0, 16 / 9.0, m)), 8, 40).astype(np.int64)
        self.dim, self.seed = dim, seed

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, index, dtype=torch.float32):
        index = np.asarray(index).reshape(-1)
        lengths = self.lengths[index]
        n = int(lengths.max())
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index[0]))
        tokens = torch.randn(len(index), n, self.dim, generator=g).to(dtype)
        return tokens, torch.arange(n)[None] < torch.as_tensor(lengths)[:, None]


def random_gallery(images: int, dim_img: int, dim_txt: int, regions: int, per: int = 5) -> RetrievalDataset:
    """A gallery of random features with realistic caption lengths (the benchmark's default)."""
    feats = RandomImages(images, regions, dim_img, seed=41).image_batch(np.arange(images)).numpy()
    texts = RandomTokens(images * per, dim_txt, seed=42)
    offsets = np.concatenate([[0], np.cumsum(texts.lengths)]).astype(np.int64)
    states = torch.randn(int(offsets[-1]), dim_txt, generator=torch.Generator().manual_seed(43)).half().numpy()
    return RetrievalDataset(name="random", split="gallery", image_ids=[str(i) for i in range(images)],
                            captions=[""] * (images * per), caption_image=np.repeat(np.arange(images), per),
                            captions_per_image=per, image_features=feats,
                            token_features=TokenFeatures(states, offsets))


def sync_device(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timing needs it)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
