"""The plain reference path: S for one (image, sentence) pair computed straight from the
paper's equations, head by head, with no batching, masking or caching. It is slow on purpose:
every fast path in `mmca.engine` is tested against it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmca.model.mmca import MMCA
from mmca.model.text_head import TextCNNHead
from mmca.model.transformer import TransformerUnit


def transformer_unit(unit: TransformerUnit, x: torch.Tensor) -> torch.Tensor:
    """Eqs. 1-4 on one unpadded sequence x (L, d): every position attends to every other."""
    d, h = unit.d, unit.heads
    dk = d // h
    w_q, w_k, w_v = unit.qkv.weight.split(d, dim=0)
    b_q, b_k, b_v = unit.qkv.bias.split(d, dim=0)
    heads = []
    for i in range(h):
        rows = slice(i * dk, (i + 1) * dk)
        q = x @ w_q[rows].T + b_q[rows]
        k = x @ w_k[rows].T + b_k[rows]
        v = x @ w_v[rows].T + b_v[rows]
        heads.append(torch.softmax(q @ k.T / math.sqrt(dk), dim=-1) @ v)  # Eq. 1
    multi = torch.cat(heads, dim=-1) @ unit.out.weight.T + unit.out.bias  # Eqs. 2-3
    x = F.layer_norm(x + multi, (d,), unit.norm1.weight, unit.norm1.bias, unit.norm1.eps)
    ffn = F.relu(x @ unit.ffn1.weight.T + unit.ffn1.bias) @ unit.ffn2.weight.T + unit.ffn2.bias  # Eq. 4
    return F.layer_norm(x + ffn, (d,), unit.norm2.weight, unit.norm2.bias, unit.norm2.eps)


def text_head(head: TextCNNHead, tokens: torch.Tensor) -> torch.Tensor:
    """Eqs. 5-7 on one unpadded sentence (n, D): p_{l,t} = ReLU(W_l e_{t:t+l-1} + b_l),
    zeros past the end; q_l = max_t p_{l,t}; c = normalise(W_e [q_1, q_2, q_3] + b_e)."""
    n = tokens.shape[0]
    pooled = []
    for width, conv in zip(head.windows, head.convs):
        padded = torch.cat([tokens, tokens.new_zeros(width - 1, tokens.shape[1])])
        p = torch.stack([
            F.relu((conv.weight * padded[t:t + width].T).sum(dim=(1, 2)) + conv.bias)
            for t in range(n)
        ])
        pooled.append(p.max(dim=0).values)
    c = torch.cat(pooled) @ head.fc.weight.T + head.fc.bias
    if head.layer_norm is not None:
        c = head.layer_norm(c)
    return c / c.norm()


@torch.no_grad()
def reference_score(model: MMCA, regions: torch.Tensor, tokens: torch.Tensor) -> float:
    """S(I, T) for one image O (k, D_img) and one caption's real tokens E (n, D_txt)."""
    r = regions @ model.region_fc.weight.T + model.region_fc.bias
    i0 = transformer_unit(model.image_unit, r).mean(dim=0)
    i0 = i0 / i0.norm()
    c0 = text_head(model.text_head, tokens)
    score = float(i0 @ c0)
    if model.alpha:
        e = tokens @ model.token_fc.weight.T + model.token_fc.bias
        y = transformer_unit(model.cross_unit, torch.cat([r, e]))
        k = r.shape[0]
        i1 = y[:k].mean(dim=0)
        i1 = i1 / i1.norm()
        c1 = text_head(model.cross_text_head, y[k:])
        score += model.alpha * float(i1 @ c1)
    return score
