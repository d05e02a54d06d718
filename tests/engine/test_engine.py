"""The scoring engine against the plain reference path and the model's batched forward."""

import numpy as np
import pytest
import torch

from mmca.config import ModelConfig
from mmca.engine import ScoringEngine, exhaustive_loss, mined_loss
from mmca.metrics import retrieval_metrics
from mmca.model import MMCA, reference_score

SMALL = ModelConfig(img_dim=24, txt_dim=20, d=32, heads=4, cnn_filters=16, dropout=0.0)


def make_gallery(config, n_images=12, per_image=5, k=7, n_max=11, seed=0, ties=True):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(n_images, k, config.img_dim, generator=g)
    m = n_images * per_image
    lengths = torch.randint(1, n_max + 1, (m,), generator=g)
    lengths[0] = n_max
    tokens = torch.randn(m, n_max, config.txt_dim, generator=g)
    mask = torch.arange(n_max)[None] < lengths[:, None]
    tokens = tokens.masked_fill(~mask[..., None], 77.0)  # padding must never leak
    if ties:  # exact duplicates: tied scores the rank convention must break against the truth
        regions[1] = regions[0]
        tokens[7], mask[7] = tokens[2], mask[2]
        tokens[11], mask[11] = tokens[1], mask[1]
    caption_image = np.repeat(np.arange(n_images), per_image)
    return regions, tokens, mask, caption_image


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = MMCA(SMALL).eval()
    regions, tokens, mask, ci = make_gallery(SMALL)
    engine = ScoringEngine(model, block_pairs=16, fused="off")  # the eager kernel (test_fused: the fused one)
    images, texts = engine.image_bank(regions), engine.text_bank((tokens, mask))
    return model, engine, images, texts, regions, tokens, mask, ci


def test_pair_scores_match_reference(small):
    model, engine, images, texts, regions, tokens, mask, _ = small
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, len(regions), (40,), generator=g)
    b = torch.randint(0, len(tokens), (40,), generator=g)
    got = engine.pair_scores(images, texts, a, b)
    for p in range(len(a)):
        n = int(mask[b[p]].sum())
        assert got[p].item() == pytest.approx(reference_score(model, regions[a[p]], tokens[b[p], :n]), abs=1e-5)


def test_full_scores_match_batched_forward_and_are_block_independent(small):
    model, engine, images, texts, regions, tokens, mask, _ = small
    full = engine.full_scores(images, texts)
    n, m = full.shape
    with torch.no_grad():
        expected = model(regions.repeat_interleave(m, 0), tokens.repeat(n, 1, 1), mask.repeat(n, 1)).view(n, m)
    assert torch.allclose(full, expected, atol=1e-5)
    # a pair scores the same floats whatever block it falls in (block sizes, order, subsets)
    other = ScoringEngine(model, block_pairs=48, fused="off")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, n, (200,), generator=g), torch.randint(0, m, (200,), generator=g)
    assert torch.equal(other.pair_scores(images, texts, a, b), full[a, b])
    assert torch.equal(other.full_scores(images, texts, image_block=5), full)


def test_global_scores_bound_full_scores(small):
    _, engine, images, texts, *_ = small
    gap = engine.full_scores(images, texts) - engine.global_scores(images, texts)
    assert gap.abs().max() <= engine.slack


@pytest.mark.parametrize("max_rank", [None, 1, 5])
def test_exact_pruned_ranks_equal_exhaustive(small, max_rank):
    _, engine, images, texts, *_, ci = small
    ex = engine.ranks(images, texts, ci, mode="exhaustive", max_rank=max_rank)
    pr = engine.ranks(images, texts, ci, mode="exact", max_rank=max_rank, image_block=5)
    assert np.array_equal(ex.i2t, pr.i2t) and np.array_equal(ex.t2i, pr.t2i)
    assert pr.pair_passes <= ex.pair_passes
    if max_rank is not None:  # capped ranks are the uncapped ones cut at the cap
        full = engine.ranks(images, texts, ci, mode="exhaustive")
        assert np.array_equal(pr.i2t, np.minimum(full.i2t, max_rank))
        assert np.array_equal(pr.t2i, np.minimum(full.t2i, max_rank))
    # memory-bounded tiles (here 1 image x 60 captions, 12 images x 4 captions): same ranks
    model = small[0]
    tiny = ScoringEngine(model, block_pairs=16, pair_budget=50)
    tb = tiny.ranks(images, texts, ci, mode="exact", max_rank=max_rank)
    assert np.array_equal(ex.i2t, tb.i2t) and np.array_equal(ex.t2i, tb.t2i)
    # (its score cache is bounded by the budget too, so a tiny budget may recompute pairs)


def test_ranks_follow_the_convention_on_ties(small):
    """Duplicated image 1 = image 0: its score ties with the true image's, and counts against."""
    _, engine, images, texts, *_, ci = small
    full = engine.full_scores(images, texts).numpy()
    res = engine.ranks(images, texts, ci, mode="exact")
    for j in range(full.shape[1]):
        g = ci[j]
        assert res.t2i[j] == sum(full[i, j] >= full[g, j] for i in range(full.shape[0]) if i != g)
    for i in range(full.shape[0]):
        true = np.nonzero(ci == i)[0]
        others = np.nonzero(ci != i)[0]
        assert res.i2t[i] == min(int((full[i, others] >= full[i, c]).sum()) for c in true)
    assert res.t2i[0] >= 1 and res.t2i[5] >= 1  # captions of image 0 lose the tie with image 1


def test_exact_ranks_prune_when_the_bound_decides():
    """With a large gap between i0·c0 values the bound decides most pairs."""
    torch.manual_seed(0)
    config = ModelConfig(img_dim=24, txt_dim=20, d=32, heads=4, cnn_filters=16, dropout=0.0, alpha=0.02)
    model = MMCA(config).eval()
    regions, tokens, mask, ci = make_gallery(config, ties=False)
    engine = ScoringEngine(model, block_pairs=16, fused="off")  # the eager kernel (test_fused: the fused one)
    images, texts = engine.image_bank(regions), engine.text_bank((tokens, mask))
    ex = engine.ranks(images, texts, ci, mode="exhaustive")
    pr = engine.ranks(images, texts, ci, mode="exact")
    assert np.array_equal(ex.i2t, pr.i2t) and np.array_equal(ex.t2i, pr.t2i)
    assert pr.pair_passes < 0.6 * ex.pair_passes


@pytest.mark.parametrize("k", [1, 3, 12])
def test_topk_equals_exhaustive(small, k):
    _, engine, images, texts, *_ = small
    for fn in (engine.topk_images, engine.topk_captions):
        s_ex, i_ex = fn(images, texts, k, mode="exhaustive")
        s_pr, i_pr = fn(images, texts, k)
        assert torch.equal(s_ex, s_pr) and torch.equal(i_ex, i_pr)
    full = engine.full_scores(images, texts)
    s, i = engine.topk_images(images, texts, k)
    assert torch.equal(s, full.T.gather(1, i))


def test_shortlist_is_exact_with_the_whole_gallery_and_reports_its_gap(small):
    _, engine, images, texts, *_, ci = small
    ex = engine.ranks(images, texts, ci, mode="exhaustive")
    full = engine.ranks(images, texts, ci, mode="shortlist", shortlist_k=len(texts))
    assert np.array_equal(full.i2t, ex.i2t) and np.array_equal(full.t2i, ex.t2i)
    short = engine.ranks(images, texts, ci, mode="shortlist", shortlist_k=2)
    assert short.exact_below is None
    assert short.pair_passes == 2 * len(texts) + 2 * len(images)
    got, want = (retrieval_metrics(r.i2t, r.t2i, r.exact_below) for r in (short, ex))
    gap = {k: got[k] - want[k] for k in want}
    assert all(np.isfinite(v) for v in gap.values())


def test_text_bank_from_token_features_and_dataset_rows(small):
    from mmca.data.dataset import TokenFeatures
    model, engine, images, texts, regions, tokens, mask, _ = small
    lengths = mask.sum(1).numpy()
    states = np.concatenate([tokens[j, :lengths[j]].numpy() for j in range(len(tokens))]).astype(np.float16)
    feats = TokenFeatures(states, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    bank = engine.text_bank(feats)
    t16 = torch.from_numpy(states.astype(np.float32))
    a = torch.arange(len(images)).repeat_interleave(3)[:20]
    b = torch.arange(20)
    got = engine.pair_scores(images, bank, a, b)
    for p in range(20):
        off = int(feats.offsets[b[p]])
        ref = reference_score(model, regions[a[p]], t16[off:off + lengths[b[p]]])
        assert got[p].item() == pytest.approx(ref, abs=1e-5)


def test_bf16_is_close_and_never_default(small):
    model, engine, images, texts, regions, tokens, mask, _ = small
    assert engine.precision == "fp32"
    fast = ScoringEngine(model, precision="bf16", block_pairs=16)
    bi, bt = fast.image_bank(regions), fast.text_bank((tokens, mask))
    diff = (fast.full_scores(bi, bt) - engine.full_scores(images, texts)).abs().max()
    assert diff < fast.score_error  # the bound mining's tie tolerance is built on


@pytest.mark.parametrize("storage", ["bf16", "fp16"])
def test_low_precision_storage_is_opt_in_close_and_consistent(small, storage):
    """Banks stored in 16 bits under fp32 compute: half the bytes, scores near the fp32 ones,
    and the exact pruned ranks still equal the exhaustive ones on the same banks."""
    model, engine, images, texts, regions, tokens, mask, ci = small
    assert engine.storage == "fp32" and engine.storage_dtype == torch.float32
    assert images.q.dtype == torch.float32 and texts.buckets[0].e.dtype == torch.float32
    low = ScoringEngine(model, block_pairs=16, storage=storage)
    assert low.dtype == torch.float32
    li, lt = low.image_bank(regions), low.text_bank((tokens, mask))
    assert li.q.dtype == lt.buckets[0].q.dtype == getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[storage])
    assert li.i0.dtype == lt.c0.dtype == li.m.dtype == torch.float32
    assert lt.nbytes < 0.6 * texts.nbytes
    diff = (low.full_scores(li, lt) - engine.full_scores(images, texts)).abs().max()
    assert 0 < diff < 0.05 * SMALL.alpha
    ex = low.ranks(li, lt, ci, mode="exhaustive")
    pr = low.ranks(li, lt, ci, mode="exact", image_block=5)
    assert np.array_equal(ex.i2t, pr.i2t) and np.array_equal(ex.t2i, pr.t2i)
    with pytest.raises(ValueError):
        ScoringEngine(model, storage="int8")


def test_exact_blocks_stream_the_exact_ranks(small):
    from mmca.engine.ranking import exact_blocks
    _, engine, images, texts, *_, ci = small
    ex = engine.ranks(images, texts, ci, mode="exhaustive")
    steps = list(exact_blocks(engine, images, texts, torch.as_tensor(ci), image_block=5))
    assert [done for *_, done in steps] == [0, 5, 10, 12]
    i2t, t2i, _ = steps[-1]
    assert np.array_equal(i2t.numpy(), ex.i2t) and np.array_equal(t2i.numpy(), ex.t2i)


def test_memory_bounded_streaming_gives_identical_results(small):
    model, _, images, texts, *_, ci = small
    big = ScoringEngine(model, block_pairs=256)
    tiny = ScoringEngine(model, block_pairs=8)
    a = big.ranks(images, texts, ci, mode="exact", image_block=64)
    b = tiny.ranks(images, texts, ci, mode="exact", image_block=2)
    assert np.array_equal(a.i2t, b.i2t) and np.array_equal(a.t2i, b.t2i)


def batch(config, b=10, k=7, n_max=11, seed=5, duplicate=True):
    regions, tokens, mask, _ = make_gallery(config, b, 1, k, n_max, seed, ties=False)
    same = None
    if duplicate:  # pairs 2 and 3 share one photo
        regions[3] = regions[2]
        same = torch.zeros(b, b, dtype=torch.bool)
        same[2, 3] = same[3, 2] = True
    return regions, tokens, mask, same


@pytest.mark.parametrize("kind", ["max", "sum"])
@pytest.mark.parametrize("duplicate", [False, True])
@pytest.mark.parametrize("alpha", [0.2, 3.0])
@pytest.mark.parametrize("margin", [0.2, 0.0])
def test_mined_loss_and_gradients_equal_exhaustive(kind, duplicate, alpha, margin):
    torch.manual_seed(1)
    config = ModelConfig(img_dim=24, txt_dim=20, d=32, heads=4, cnn_filters=16, dropout=0.0, alpha=alpha)
    model = MMCA(config).eval()
    regions, tokens, mask, same = batch(config, duplicate=duplicate)
    model.zero_grad()
    full = exhaustive_loss(model, regions, tokens, mask, margin, same, kind)
    full.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    stats = {}
    got = mined_loss(model, regions, tokens, mask, margin, same, kind, stats=stats)
    got.backward()
    assert got.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    for w, p in zip(want, model.parameters()):
        assert torch.allclose(p.grad, w, atol=1e-5, rtol=1e-4)
    if kind == "max":
        # <= 3B; a duplicated photo ties exactly with its copy, and ties are all recomputed
        assert stats["recomputed_pairs"] <= (4 if duplicate else 3) * len(regions)
    elif margin == 0.0:  # only the violating negatives carry a gradient; some do not violate
        assert stats["recomputed_pairs"] < len(regions) ** 2
    assert not model.training


@pytest.mark.parametrize("granule", [1, 3, 8, 64])
def test_recompute_equals_the_plain_pairs_with_grad(granule):
    """Q/K/V once per item and captions cut to their length bucket: the same scores and the same
    gradients as the cross unit on each gathered pair padded to the batch's longest caption."""
    from mmca.engine.mining import _pair_scores_grad, _plain_pair_scores_grad

    torch.manual_seed(2)
    model = MMCA(SMALL).eval()
    regions, tokens, mask, _ = make_gallery(SMALL, n_images=6, per_image=1, ties=False)
    g = torch.Generator().manual_seed(4)
    a = torch.cat([torch.arange(6), torch.randint(0, 6, (9,), generator=g), torch.tensor([2, 2])])
    b = torch.cat([torch.arange(6), torch.randint(0, 6, (9,), generator=g), torch.tensor([0, 0])])
    results = []
    for fn in (_plain_pair_scores_grad, lambda *x: _pair_scores_grad(*x, granule=granule)):
        model.zero_grad()
        r, i0 = model.encode_image(regions)
        e, c0 = model.encode_text(tokens, mask)
        s = fn(model, r, i0, e, c0, mask, a, b)
        (s * torch.linspace(-1, 2, len(s))).sum().backward()
        results.append((s.detach(), [p.grad.clone() for p in model.parameters()]))
    (s_plain, g_plain), (s_fast, g_fast) = results
    assert torch.allclose(s_fast, s_plain, atol=1e-6)
    for want, got in zip(g_plain, g_fast):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    none = torch.zeros(0, dtype=torch.long)  # a rank's empty share of a small global batch
    assert _pair_scores_grad(model, r, i0, e, c0, mask, none, none).shape == (0,)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("duplicate", [False, True])
@pytest.mark.parametrize("margin", [0.2, 0.0])
def test_mining_rounds_give_the_same_loss_with_fewer_passes(precision, duplicate, margin):
    """Scoring each row's and column's best candidate first only raises the bars: the loss over
    the picked pairs (at their float32 scores) is that of one round over every candidate."""
    from mmca.engine.mining import _batch_banks, mine_pairs
    from mmca.loss import max_violation_loss

    torch.manual_seed(3)
    model = MMCA(SMALL).eval()
    regions, tokens, mask, same = batch(SMALL, b=24, duplicate=duplicate)
    engine = ScoringEngine(model, precision=precision, check_weights=False, fixed_shape=False)
    with torch.no_grad():
        r, i0 = model.encode_image(regions)
        e, c0 = model.encode_text(tokens, mask)
        images, texts = _batch_banks(engine, r, i0, e, c0, mask)
        exact = ScoringEngine(model).full_scores(*_batch_banks(ScoringEngine(model), r, i0, e, c0, mask))
        losses, passes = {}, {}
        for rounds in (1, 2, 3):
            a, b, passes[rounds] = mine_pairs(engine, images, texts, margin, same, rounds=rounds)
            picked = torch.full_like(exact, float("-inf")).index_put((a, b), exact[a, b])
            losses[rounds] = max_violation_loss(picked, margin, same).item()
    assert losses[2] == losses[1] == losses[3] == pytest.approx(max_violation_loss(exact, margin, same).item())
    assert passes[3] <= passes[2] < passes[1]


def test_mined_loss_keeps_training_mode():
    model = MMCA(SMALL).train()
    regions, tokens, mask, same = batch(SMALL)
    mined_loss(model, regions, tokens, mask, same_image=same).backward()
    assert model.training and model.cross_unit.training


def test_real_shapes_on_a_handful_of_pairs():
    torch.manual_seed(0)
    config = ModelConfig(txt_dim=384, dropout=0.0)  # d 256, 16 heads, 1280 / 384 (MiniLM)
    model = MMCA(config).eval()
    g = torch.Generator().manual_seed(0)
    regions = torch.randn(3, 36, 1280, generator=g)
    lengths = torch.tensor([16, 9, 23])
    tokens = torch.randn(3, 23, config.txt_dim, generator=g)
    mask = torch.arange(23)[None] < lengths[:, None]
    for precision, tol in (("fp32", 2e-5), ("bf16", 2e-2)):
        engine = ScoringEngine(model, precision=precision)
        images, texts = engine.image_bank(regions), engine.text_bank((tokens, mask))
        full = engine.full_scores(images, texts)
        for i in range(3):
            for j in range(3):
                ref = reference_score(model, regions[i], tokens[j, :lengths[j]])
                assert full[i, j].item() == pytest.approx(ref, abs=tol)


def test_under_dropout_negatives_are_chosen_in_eval_mode_and_scored_with_dropout():
    """The mined step at dropout > 0 (docs/model.md): the hardest negatives of the eval-mode
    scores of the batch's (train-mode) encodings, re-scored in training mode. The recompute is
    the real one, wrapped to record its pairs, its mode and its scores."""
    from mmca.engine.mining import _pair_scores_grad, _plain_pair_scores_grad, loss_from_encodings
    from mmca.engine.scoring import inference_mode
    from mmca.loss import max_violation_loss

    torch.manual_seed(4)
    model = MMCA(ModelConfig(img_dim=24, txt_dim=20, d=32, heads=4, cnn_filters=16, dropout=0.3)).train()
    regions, tokens, mask, same = batch(SMALL, b=12)
    r, i0 = model.encode_image(regions)
    e, c0 = model.encode_text(tokens, mask)
    seen = {}

    def recompute(model, *args):
        seen.update(training=model.cross_unit.training, pairs=(args[-2], args[-1]))
        seen["scores"] = _pair_scores_grad(model, *args)
        return seen["scores"]

    loss = loss_from_encodings(model, r, i0, e, c0, mask, 0.2, same, "max", recompute=recompute)
    a, b = seen["pairs"]
    assert seen["training"] and model.training  # scored with dropout, and the mode left as it was
    # the loss is the hinge over the recomputed (dropout) scores of the picked pairs
    picked = torch.full((12, 12), float("-inf")).index_put((a, b), seen["scores"])
    assert loss.item() == pytest.approx(max_violation_loss(picked, 0.2, same).item(), rel=1e-6)
    # the picks hold each row's and column's hardest negative under the eval-mode cross unit
    with torch.no_grad(), inference_mode(model):
        grid = torch.arange(12)
        s_eval = _plain_pair_scores_grad(model, r, i0, e, c0, mask, grid.repeat_interleave(12),
                                         grid.repeat(12)).view(12, 12)
    # with dropout on, the recompute's scores are not the eval-mode ones
    assert not torch.allclose(seen["scores"].detach(), s_eval[a, b], atol=1e-3)
    neg = ~(torch.eye(12, dtype=torch.bool) | same)
    s_eval = s_eval.masked_fill(~neg, float("-inf"))
    chosen = torch.zeros(12, 12, dtype=torch.bool).index_put((a, b), torch.tensor(True))
    assert chosen[grid, s_eval.argmax(1)].all() and chosen[s_eval.argmax(0), grid].all()
    assert len(a) < 12 * 12  # not every pair: mined, not exhaustive
