"""The batched model against the plain reference path (the oracle) on random inputs."""

import pytest
import torch

from mmca.config import ModelConfig
from mmca.model import MMCA, reference_score

SMALL = ModelConfig(img_dim=24, txt_dim=20, d=32, heads=4, cnn_filters=16, dropout=0.0)


def random_batch(config: ModelConfig, b: int = 5, k: int = 7, n_max: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(b, k, config.img_dim, generator=g)
    lengths = torch.randint(2, n_max + 1, (b,), generator=g)
    lengths[0] = n_max
    tokens = torch.randn(b, n_max, config.txt_dim, generator=g)
    mask = torch.arange(n_max)[None] < lengths[:, None]
    tokens = tokens.masked_fill(~mask[..., None], 123.0)  # padding must never leak into a score
    return regions, tokens, mask, lengths


@pytest.mark.parametrize("config", [
    SMALL,
    ModelConfig(img_dim=24, txt_dim=20, d=32, heads=4, cnn_filters=16, dropout=0.0, ffn_dim=48,
                text_norm="layernorm_l2", alpha=0.5),
    ModelConfig(img_dim=24, txt_dim=20, d=32, heads=4, cnn_filters=16, dropout=0.0, alpha=0.0),
])
def test_batched_forward_matches_reference(config):
    torch.manual_seed(0)
    model = MMCA(config).eval()
    regions, tokens, mask, lengths = random_batch(config)
    with torch.no_grad():
        batched = model(regions, tokens, mask)
    for b in range(len(regions)):
        expected = reference_score(model, regions[b], tokens[b, : lengths[b]])
        assert batched[b].item() == pytest.approx(expected, abs=1e-5)


def test_scores_are_bounded_by_the_global_score():
    """|S - i0·c0| <= α: the bound the exact pruning relies on."""
    model = MMCA(SMALL).eval()
    regions, tokens, mask, _ = random_batch(SMALL, b=8)
    with torch.no_grad():
        _, i0 = model.encode_image(regions)
        _, c0 = model.encode_text(tokens, mask)
        gap = model(regions, tokens, mask) - (i0 * c0).sum(-1)
    assert gap.abs().max() <= SMALL.alpha + 1e-6


def test_default_config_is_the_papers():
    c = ModelConfig()
    assert (c.d, c.heads, c.ffn, c.alpha, c.cnn_filters, c.windows) == (256, 16, 256, 0.2, 256, (1, 2, 3))


def test_config_rejects_heads_not_dividing_d():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d=30, heads=4)
