"""The MMCA network (docs/model.md): a self-attention module per modality and a cross-attention
module over the stacked regions and words, scored as S = i0·c0 + α·i1·c1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmca.config import ModelConfig
from mmca.model.text_head import TextCNNHead
from mmca.model.transformer import TransformerUnit


class MMCA(nn.Module):
    """Image regions O (B, k, D_img) and frozen token states E (B, n, D_txt) with a mask.

    The per-item parts (`encode_image`, `encode_text`) do not depend on the pair; only
    `cross` does, which is why the engine precomputes the former and batches the latter.
    """

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        c = self.config = config
        self.region_fc = nn.Linear(c.img_dim, c.d)  # O -> R, shared by both modules
        self.image_unit = TransformerUnit(c.d, c.heads, c.ffn, c.dropout)
        self.text_head = TextCNNHead(c.txt_dim, c.d, c.cnn_filters, c.windows, c.text_norm)
        self.token_fc = nn.Linear(c.txt_dim, c.d)  # E -> E'
        self.cross_unit = TransformerUnit(c.d, c.heads, c.ffn, c.dropout)
        self.cross_text_head = TextCNNHead(c.d, c.d, c.cnn_filters, c.windows, c.text_norm)
        # When False the model scores S = i0·c0 (α = 0) without changing its config: the first,
        # cheap stage of a staged training run (TrainConfig.cross_from_epoch). Not saved.
        self.cross_enabled = True

    @property
    def alpha(self) -> float:
        return self.config.alpha if self.cross_enabled else 0.0

    def encode_image(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (R, i0): projected regions (B, k, d) for the cross module, unit i0 (B, d)."""
        r = self.region_fc(regions)
        i0 = F.normalize(self.image_unit(r).mean(dim=1), dim=-1)
        return r, i0

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (E', c0): projected tokens (B, n, d) for the cross module, unit c0 (B, d)."""
        return self.token_fc(tokens), self.text_head(tokens, mask)

    def cross(self, r: torch.Tensor, e: torch.Tensor, mask: torch.Tensor,
              qkv: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention unit over aligned pairs: R (P, k, d), E' (P, n, d), mask (P, n)
        -> (i1, c1), each (P, d) and unit length. `qkv`: the cross unit's projections of R and
        of E' where the caller has them (`cross_unit.qkv(r)`, `cross_unit.qkv(e)`)."""
        k = r.shape[1]
        key_mask = torch.cat([mask.new_ones(mask.shape[0], k), mask], dim=1)
        y = self.cross_unit(torch.cat([r, e], dim=1), key_mask,
                            qkv=None if qkv is None else torch.cat(qkv, dim=1))
        i1 = F.normalize(y[:, :k].mean(dim=1), dim=-1)
        c1 = self.cross_text_head(y[:, k:], mask)
        return i1, c1

    def forward(self, regions: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """S for aligned pairs: image b with caption b -> (B,)."""
        r, i0 = self.encode_image(regions)
        e, c0 = self.encode_text(tokens, mask)
        score = (i0 * c0).sum(-1)
        if self.alpha:
            i1, c1 = self.cross(r, e, mask)
            score = score + self.alpha * (i1 * c1).sum(-1)
        return score
