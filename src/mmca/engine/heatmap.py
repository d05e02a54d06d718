"""Where a sentence's words look in an image: the cross unit's token-over-region attention,
for the search page's and the API's heat maps."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from mmca.engine.bank import ImageBank
from mmca.engine.guards import full_fp32
from mmca.engine.scoring import ScoringEngine


@torch.no_grad()
def token_heatmap(engine: ScoringEngine, tokenizer, ids, tokens, texts, images: ImageBank,
                  index: int) -> dict[str, Any]:
    """Where each token of one sentence looks in image `index` of `images`: its cross-unit
    attention over the regions (mean over heads; the rest of each row goes to the sentence's
    own tokens), and the pair's full score. `ids`, `tokens`, `texts`: the sentence's token ids,
    token states and one-caption bank. -> tokens (words), weights (n, k), region_mass (n),
    grid side (None if k is not a square), score."""
    states, mask = tokens.batch([0])
    r = images.r[index:index + 1].float()
    with full_fp32():
        weights = cross_token_region_attention(engine.model, r, states.to(engine.device), mask.to(engine.device))[0]
        score = float(engine.pair_scores(images, texts, [index], [0])[0])
    side = math.isqrt(r.shape[1])
    return {"tokens": tokenizer.convert_ids_to_tokens(ids), "weights": weights.cpu(),
            "region_mass": weights.sum(1).cpu(), "grid": side if side * side == r.shape[1] else None,
            "score": score}


def cross_token_region_attention(model, r: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The cross unit's attention weights of each token row over the region keys, averaged
    over heads: r (B, k, d) projected regions, tokens (B, n, D_txt) frozen states, mask (B, n)
    -> (B, n, k). Computed from the unit's own `qkv` exactly as its forward pass does (the
    softmax runs over all k + n keys, padded tokens masked)."""
    unit = model.cross_unit
    e = model.token_fc(tokens)
    y = torch.cat([r, e], dim=1)
    q, kk, _ = (unit.split_heads(t) for t in unit.qkv(y).chunk(3, dim=-1))
    logits = (q @ kk.transpose(-1, -2)) / math.sqrt(unit.d // unit.heads)
    key_mask = torch.cat([mask.new_ones(mask.shape[0], r.shape[1]), mask], dim=1)
    logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    att = F.softmax(logits, dim=-1)  # (B, h, k + n, k + n)
    k = r.shape[1]
    return att[:, :, k:, :k].mean(dim=1)
