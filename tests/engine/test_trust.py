"""What keeps the engine's numbers honest: non-finite values never become a metric, α is
validated, ties follow the chosen convention in every mode, exact modes run in full float32,
every block has one shape, and the capped mode's score cache stays within its budget."""

import numpy as np
import pytest
import torch
from test_engine import SMALL, make_gallery

from mmca.config import ModelConfig, TrainConfig
from mmca.data.dataset import RetrievalDataset, TokenFeatures
from mmca.engine import ScoringEngine, ranking, scoring
from mmca.errors import ConfigError, NonFiniteError
from mmca.evaluate import evaluate
from mmca.metrics import ranks_from_scores
from mmca.model import MMCA


@pytest.fixture(scope="module")
def gallery():
    torch.manual_seed(0)
    model = MMCA(SMALL).eval()
    regions, tokens, mask, ci = make_gallery(SMALL)  # with exact duplicate images and captions
    return model, regions, tokens, mask, ci


def nan_model(model):
    bad = MMCA(model.config).eval()
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        bad.cross_text_head.fc.bias[0] = float("nan")
    return bad


def as_dataset(regions, tokens, mask, ci):
    lengths = mask.sum(1).numpy()
    states = np.concatenate([tokens[j, :n].numpy() for j, n in enumerate(lengths)]).astype(np.float16)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return RetrievalDataset(name="g", split="dev", image_ids=[str(i) for i in range(len(regions))],
                            captions=[f"c{j}" for j in range(len(ci))], caption_image=ci, captions_per_image=5,
                            image_features=regions.numpy(), token_features=TokenFeatures(states, offsets))


@pytest.mark.parametrize("mode", ["exact", "exhaustive", "shortlist"])
def test_a_nan_weight_never_becomes_a_metric(gallery, mode):
    model, regions, tokens, mask, ci = gallery
    with pytest.raises(NonFiniteError, match="weights .*cross_text_head.fc.bias.* NaN"):
        evaluate(nan_model(model), as_dataset(regions, tokens, mask, ci), mode=mode)


def test_nan_features_and_banks_are_named(gallery):
    model, regions, tokens, mask, ci = gallery
    engine = ScoringEngine(model)
    bad = regions.clone()
    bad[5, 2, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"image region features contain Inf \(image 5\)"):
        engine.image_bank(bad)
    images, texts = engine.image_bank(regions), engine.text_bank((tokens, mask))
    images.i0[3, 0] = float("nan")  # e.g. a damaged index file
    for call in (lambda: engine.ranks(images, texts, ci, mode="exact", max_rank=10),
                 lambda: engine.ranks(images, texts, ci, mode="exhaustive"),
                 lambda: engine.ranks(images, texts, ci, mode="shortlist"),
                 lambda: engine.topk_images(images, texts, 5),
                 lambda: engine.topk_captions(images, texts, 5)):
        with pytest.raises(NonFiniteError, match=r"i0 contain NaN \(image 3\)"):
            call()
    images.i0[3, 0] = 0.0
    images.q[2] = float("nan")  # per-item tensors: caught on the scores
    with pytest.raises(NonFiniteError, match="pair scores contain NaN"):
        engine.ranks(images, texts, ci, mode="exhaustive")


def test_alpha_and_training_options_are_validated():
    with pytest.raises(ConfigError, match="alpha=-0.2 must be"):
        ModelConfig(alpha=-0.2)
    with pytest.raises(ConfigError, match="alpha=nan"):
        ModelConfig(alpha=float("nan"))
    for bad in (dict(epochs=0), dict(batch_size=1), dict(lr=-1.0), dict(val_max_rank=5),
                dict(mining_precision="fp8"), dict(grad_clip=0.0)):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d=250, heads=16)


@pytest.mark.parametrize("ties", ["pessimistic", "argsort"])
def test_every_mode_breaks_ties_as_the_oracle(gallery, ties):
    model, regions, tokens, mask, ci = gallery
    engine = ScoringEngine(model, block_pairs=16)
    images, texts = engine.image_bank(regions), engine.text_bank((tokens, mask))
    want_i2t, want_t2i = ranks_from_scores(engine.full_scores(images, texts), ci, ties=ties)
    for kw in (dict(mode="exhaustive"), dict(mode="exact"), dict(mode="exact", image_block=5),
               dict(mode="shortlist", shortlist_k=len(ci))):
        got = engine.ranks(images, texts, ci, ties=ties, **kw)
        assert np.array_equal(got.i2t, want_i2t) and np.array_equal(got.t2i, want_t2i), kw
    capped = engine.ranks(images, texts, ci, mode="exact", max_rank=5, ties=ties)
    assert np.array_equal(capped.i2t, np.minimum(want_i2t, 5))
    assert np.array_equal(capped.t2i, np.minimum(want_t2i, 5))


def test_the_argsort_convention_by_hand():
    # image 0 owns caption 0, image 1 owns caption 1; every score ties at 1.0
    s = np.ones((2, 2))
    assert [r.tolist() for r in ranks_from_scores(s, [0, 1])] == [[1, 1], [1, 1]]  # pessimistic
    # argsort order (higher index first among ties): caption 1 is ahead of caption 0 for image 0,
    # caption 0 is behind caption 1 for image 1; images likewise
    i2t, t2i = ranks_from_scores(s, [0, 1], ties="argsort")
    assert i2t.tolist() == [1, 0] and t2i.tolist() == [1, 0]
    # the same as VSE++'s numpy.argsort(d)[::-1] with a stable sort
    for i in range(2):
        order = np.argsort(s[i], kind="stable")[::-1]
        assert int(np.where(order == i)[0][0]) == i2t[i]


def test_exact_modes_run_in_full_fp32_and_blocks_have_one_shape(gallery, monkeypatch):
    model, regions, tokens, mask, ci = gallery
    engine = ScoringEngine(model, block_pairs=16)
    images, texts = engine.image_bank(regions), engine.text_bank((tokens, mask))
    seen = []

    real_block = scoring.score_block

    def spy(weights, img, bucket, c0, a, rows, cross):
        seen.append((len(a), torch.get_float32_matmul_precision()))
        return real_block(weights, img, bucket, c0, a, rows, cross)

    monkeypatch.setattr(scoring, "score_block", spy)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # e.g. a user's global TF32 switch
    try:
        engine.ranks(images, texts, ci, mode="exact", max_rank=10)
        engine.topk_images(images, texts, 3)
        assert torch.get_float32_matmul_precision() == "medium"  # restored afterwards
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen and {n for n, _ in seen} == {16} and {p for _, p in seen} == {"highest"}


def test_the_capped_score_cache_stays_within_the_pair_budget(gallery, monkeypatch):
    model, regions, tokens, mask, ci = gallery
    sizes = []
    real_add = ranking._PairCache._add

    def add(self, keys, vals):
        real_add(self, keys, vals)
        sizes.append(len(self))

    monkeypatch.setattr(ranking._PairCache, "_add", add)
    tiny = ScoringEngine(model, block_pairs=16, pair_budget=40)
    images, texts = tiny.image_bank(regions), tiny.text_bank((tokens, mask))
    got = tiny.ranks(images, texts, ci, mode="exact", max_rank=10)
    want = ScoringEngine(model, block_pairs=16).ranks(images, texts, ci, mode="exhaustive", max_rank=10)
    assert np.array_equal(got.i2t, want.i2t) and np.array_equal(got.t2i, want.t2i)
    assert sizes and max(sizes) <= 40


def test_exhaustive_mode_scores_each_pair_once(gallery):
    model, regions, tokens, mask, ci = gallery
    engine = ScoringEngine(model)
    images, texts = engine.image_bank(regions), engine.text_bank((tokens, mask))
    result = engine.ranks(images, texts, ci, mode="exhaustive")
    assert result.pair_passes == len(regions) * len(ci)  # 100 %, not 100 % + the thresholds
