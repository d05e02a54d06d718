"""The exact paths with pruning on: a model whose i0·c0 spread is far wider than 2α, so the
bound i0·c0 ± α decides most pairs, on a gallery with duplicate images, duplicate captions and
exact ties. Every test checks the ranks (or top-k) against scoring every pair AND that the
pruned path scored at most half of the pairs, so it fails if the bound stops deciding.

The model is trained for a few Adam steps on clustered synthetic data (4 clusters of 8 images,
3 captions each): pairs across clusters sit far apart in i0·c0 and are decided by the bound;
pairs within a cluster are close and need the cross unit."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmca.config import ModelConfig
from mmca.dist import Shard
from mmca.engine import ImageBank, ScoringEngine
from mmca.loss import max_violation_loss
from mmca.model import MMCA
from mmca.search.index import GalleryIndex, IndexWriter
from mmca.search.query import gathered_topk

CONFIG = ModelConfig(img_dim=24, txt_dim=20, d=32, heads=4, cnn_filters=16, dropout=0.0, alpha=0.2)
IMAGES, PER_IMAGE, CLUSTERS, REGIONS, MAX_LEN = 32, 3, 4, 5, 9
CAPTIONS = IMAGES * PER_IMAGE
ALL_PAIRS = IMAGES * CAPTIONS


def clustered(seed: int):
    """Regions and caption tokens around one centre per cluster (the centres are fixed; `seed`
    draws the noise), with the caption -> image map."""
    g = torch.Generator().manual_seed(0)
    img_centre = 2 * torch.randn(CLUSTERS, CONFIG.img_dim, generator=g)
    txt_centre = 2 * torch.randn(CLUSTERS, CONFIG.txt_dim, generator=g)
    g.manual_seed(seed)
    cluster = torch.arange(IMAGES) // (IMAGES // CLUSTERS)
    caption_image = np.repeat(np.arange(IMAGES), PER_IMAGE)
    regions = img_centre[cluster][:, None] + 0.3 * torch.randn(IMAGES, REGIONS, CONFIG.img_dim, generator=g)
    tokens = txt_centre[cluster[caption_image]][:, None] + 0.3 * torch.randn(CAPTIONS, MAX_LEN, CONFIG.txt_dim,
                                                                             generator=g)
    lengths = torch.randint(2, MAX_LEN + 1, (CAPTIONS,), generator=g)
    lengths[0] = MAX_LEN
    mask = torch.arange(MAX_LEN)[None] < lengths[:, None]
    return regions, tokens.masked_fill(~mask[..., None], 77.0), mask, caption_image, cluster


def trained_model() -> MMCA:
    """A few steps of the global loss with each cluster as one class: the clusters separate in
    i0·c0 by more than the margin 1.0 = 5α."""
    torch.manual_seed(0)
    model = MMCA(CONFIG)
    regions, tokens, mask, ci, cluster = clustered(seed=1)
    same = cluster[ci][:, None] == cluster[ci][None, :]
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(80):
        _, i0 = model.encode_image(regions[ci])
        _, c0 = model.encode_text(tokens, mask)
        loss = max_violation_loss(i0 @ c0.T, 1.0, same)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def gallery():
    """The test gallery: image 1 = image 0 (tied scores), captions 4 = 1 and 7 = 0 (duplicates
    of one photo's captions on another's), caption 30 (image 10, cluster 1) = caption 3
    (cluster 0): its true image ranks behind a whole cluster, so rank caps bite."""
    regions, tokens, mask, ci, _ = clustered(seed=2)
    regions[1] = regions[0]
    for dst, src in ((4, 1), (7, 0), (30, 3)):
        tokens[dst], mask[dst] = tokens[src], mask[src]
    return regions, tokens, mask, ci


@pytest.fixture(scope="module")
def pruned():
    model = trained_model()
    regions, tokens, mask, ci = gallery()
    engine = ScoringEngine(model, block_pairs=16)
    images, texts = engine.image_bank(regions), engine.text_bank((tokens, mask))
    g = engine.global_scores(images, texts)
    assert float(g.max() - g.min()) > 6 * engine.alpha  # the bound has room to decide
    return model, engine, images, texts, ci


def same_ranks(a, b) -> bool:
    return np.array_equal(a.i2t, b.i2t) and np.array_equal(a.t2i, b.t2i)


def test_prun_fixture_has_ties_that_matter_and_ranks_beyond_the_caps(pruned):
    _, engine, images, texts, ci = pruned
    pess = engine.ranks(images, texts, ci, mode="exhaustive", ties="pessimistic")
    arg = engine.ranks(images, texts, ci, mode="exhaustive", ties="argsort")
    assert not same_ranks(pess, arg)  # exact ties change ranks: the tie rule is exercised
    assert pess.t2i.max() >= 10 and pess.i2t.max() >= 10  # max_rank 10 caps some queries


@pytest.mark.parametrize("ties", ["pessimistic", "argsort"])
@pytest.mark.parametrize("max_rank", [None, 1, 5, 10])
def test_prun_exact_ranks_equal_exhaustive(pruned, max_rank, ties):
    _, engine, images, texts, ci = pruned
    ex = engine.ranks(images, texts, ci, mode="exhaustive", max_rank=max_rank, ties=ties)
    pr = engine.ranks(images, texts, ci, mode="exact", max_rank=max_rank, ties=ties, image_block=5)
    assert ex.pair_passes == ALL_PAIRS
    assert same_ranks(pr, ex)
    assert pr.pair_passes <= ALL_PAIRS // 2
    if max_rank is not None:  # the cap is applied, not only reported
        assert pr.i2t.max() == pr.t2i.max() == max_rank
        assert np.array_equal(pr.t2i, np.minimum(engine.ranks(images, texts, ci, mode="exhaustive", ties=ties).t2i,
                                                 max_rank))


@pytest.mark.parametrize("max_rank", [None, 10])
def test_prun_tiny_pair_budget_gives_the_same_ranks(pruned, max_rank):
    """A budget of 50 pairs: tiles of one image x all captions (or 32 images x 1 caption)."""
    model, engine, images, texts, ci = pruned
    ex = engine.ranks(images, texts, ci, mode="exhaustive", max_rank=max_rank)
    tiny = ScoringEngine(model, block_pairs=16, pair_budget=50)
    tb = tiny.ranks(images, texts, ci, mode="exact", max_rank=max_rank)
    assert same_ranks(tb, ex)
    assert tb.pair_passes <= ALL_PAIRS // 2


@pytest.mark.parametrize("k", [1, 5])
def test_prun_topk_both_ways_equals_exhaustive(pruned, k):
    _, engine, images, texts, _ = pruned
    for fn in (engine.topk_images, engine.topk_captions):
        want = fn(images, texts, k, mode="exhaustive")
        start = engine.pair_passes
        got = fn(images, texts, k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert engine.pair_passes - start <= ALL_PAIRS // 2


def test_prun_memory_mapped_search_walk_equals_exhaustive(pruned, tmp_path):
    """The search's walk over an index's memory-mapped shards, in chunks of 4 images."""
    _, engine, images, texts, ci = pruned
    with IndexWriter(tmp_path / "index", meta={"storage": "fp32"}) as writer:
        writer.add_images(images, [f"img{i}" for i in range(IMAGES)], [None] * IMAGES)
    index = GalleryIndex(tmp_path / "index")
    rows = lambda ids: ImageBank(**index.image_rows(ids))  # noqa: E731
    _, tokens, mask, _ = gallery()
    walked = 0
    for j in range(CAPTIONS):
        one = engine.text_bank((tokens, mask), index=[j])
        for k in (1, 5):
            want_s, want_i = engine.topk_images(images, one, k, mode="exhaustive")
            start = engine.pair_passes
            s, i, _ = gathered_topk(engine, index.i0(), rows, one, k, first_chunk=4)
            walked += engine.pair_passes - start
            assert torch.equal(i, want_i[0]) and torch.equal(s, want_s[0])
    assert walked <= 2 * CAPTIONS * IMAGES // 2


CASES = [dict(mode="exact", max_rank=None), dict(mode="exact", max_rank=10),
         dict(mode="exact", max_rank=5, ties="argsort")]


def _shard_worker(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        model = MMCA(CONFIG)
        model.load_state_dict(torch.load(os.path.join(root, "model.pt")))
        regions, tokens, mask, ci = gallery()
        engine = ScoringEngine(model.eval(), block_pairs=16)
        images, texts = engine.image_bank(regions), engine.text_bank((tokens, mask))
        out = []
        for case in CASES:
            r = engine.ranks(images, texts, ci, shard=Shard(rank, world), **case)
            out.append({"i2t": r.i2t.tolist(), "t2i": r.t2i.tolist(), "passes": r.pair_passes})
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_prun_two_gloo_ranks_sharded_equal_exhaustive(pruned, tmp_path):
    model, engine, images, texts, ci = pruned
    torch.save(model.state_dict(), tmp_path / "model.pt")
    mp.spawn(_shard_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, got in zip(CASES, results):
            want = engine.ranks(images, texts, ci, mode="exhaustive", max_rank=case["max_rank"],
                                ties=case.get("ties", "pessimistic"))
            assert got["i2t"] == want.i2t.tolist() and got["t2i"] == want.t2i.tolist(), case
            assert got["passes"] <= ALL_PAIRS // 2, case
