"""The sentence head of the paper (Eqs. 5-7): 1-D convolutions with windows 1, 2, 3 over the
token sequence, max-pool over the real tokens, concatenate, FC, normalise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TextCNNHead(nn.Module):
    """Tokens (B, n, in_dim) with a mask (B, n) -> a unit sentence vector (B, out_dim).

    Padded positions are zeroed before the convolutions and the sequence is padded with zeros
    at its end, so every window length yields one output per real token and a caption scores
    the same alone or in a padded batch.
    """

    def __init__(self, in_dim: int, out_dim: int, filters: int = 256,
                 windows: tuple[int, ...] = (1, 2, 3), norm: str = "l2"):
        super().__init__()
        self.windows = tuple(windows)
        self.convs = nn.ModuleList(nn.Conv1d(in_dim, filters, w) for w in self.windows)
        self.fc = nn.Linear(filters * len(self.windows), out_dim)
        self.layer_norm = nn.LayerNorm(out_dim) if norm == "layernorm_l2" else None

    def pooled(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Concatenated max-pooled n-gram features q_1..q_3 (B, filters * len(windows))."""
        x = (tokens * mask.unsqueeze(-1).to(tokens.dtype)).transpose(1, 2)  # (B, in_dim, n)
        pad_mask = ~mask.unsqueeze(1)
        pooled = []
        for width, conv in zip(self.windows, self.convs):
            p = F.relu(conv(F.pad(x, (0, width - 1))))  # (B, filters, n)
            pooled.append(p.masked_fill(pad_mask, float("-inf")).amax(dim=-1))
        return torch.cat(pooled, dim=-1)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = self.fc(self.pooled(tokens, mask))
        if self.layer_norm is not None:
            c = self.layer_norm(c)
        return F.normalize(c, dim=-1)
