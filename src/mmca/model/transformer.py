"""The Transformer unit of Fig. 3: multi-head attention and a position-wise FFN, each followed
by residual + LayerNorm (post-norm, as the paper draws it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TransformerUnit(nn.Module):
    """One Transformer unit. Q/K/V come from one fused projection (`qkv`) so that callers can
    compute them once per item and reuse them across pairs (the engine does)."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.d, self.heads = d, heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d)
        self.ffn1 = nn.Linear(d, ffn)
        self.ffn2 = nn.Linear(ffn, d)
        self.norm2 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> (B, heads, L, d / heads)."""
        b, length, _ = x.shape
        return x.view(b, length, self.heads, self.d // self.heads).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, L, d / heads) -> (B, L, d)."""
        b, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(b, length, self.d)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Everything after the attention weights: output projection, residual + LayerNorm,
        FFN, residual + LayerNorm. `attended` is the merged (B, L, d) heads output."""
        x = self.norm1(x + self.dropout(self.out(attended)))
        return self.norm2(x + self.dropout(self.ffn2(F.relu(self.ffn1(x)))))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                qkv: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, d); key_mask: (B, L) bool, True where the position may be attended to;
        qkv: `self.qkv(x)` where the caller has it already (projected once per item and
        gathered for each pair the item is in: the training recompute)."""
        qkv = self.qkv(x) if qkv is None else qkv
        q, k, v = (self.split_heads(t) for t in qkv.chunk(3, dim=-1))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.finish(x, self.merge_heads(attended))
