"""N ranks train as one process, gradient by gradient: real gloo groups of 2 and 3 processes
split a global batch of 41 (uneven shares, a photo duplicated across ranks) and each rank's
averaged gradient of every parameter, and the weights after one plain SGD step, equal one
process's mined loss on the whole batch. Plain SGD without clipping passes any gradient scale
error straight into the weights (Adam or clipping would hide one)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmca.config import ModelConfig
from mmca.dist import Shard
from mmca.engine import mined_loss
from mmca.engine.global_batch import average_gradients, global_mined_loss
from mmca.model import MMCA

CONFIG = ModelConfig(img_dim=24, txt_dim=20, d=32, heads=4, cnn_filters=16, dropout=0.0, alpha=0.2)
BATCH, REGIONS, MAX_LEN, LR = 41, 5, 9, 0.05
DUPLICATES = ((5, 30), (19, 25))  # each pair one photo, held by different ranks at W = 2 and 3


def model() -> MMCA:
    torch.manual_seed(0)
    return MMCA(CONFIG).eval()


def batch():
    g = torch.Generator().manual_seed(7)
    regions = torch.randn(BATCH, REGIONS, CONFIG.img_dim, generator=g)
    lengths = torch.randint(1, MAX_LEN + 1, (BATCH,), generator=g)
    lengths[3] = MAX_LEN
    mask = torch.arange(MAX_LEN)[None] < lengths[:, None]
    tokens = torch.randn(BATCH, MAX_LEN, CONFIG.txt_dim, generator=g).masked_fill(~mask[..., None], 0.0)
    same = torch.zeros(BATCH, BATCH, dtype=torch.bool)
    for a, b in DUPLICATES:
        regions[b] = regions[a]
        same[a, b] = same[b, a] = True
    return regions, tokens, mask, same


def step(net: MMCA) -> dict[str, torch.Tensor]:
    """One plain SGD step on the gradients the parameters hold: the new weights."""
    with torch.no_grad():
        for p in net.parameters():
            p -= LR * p.grad
    return {k: v.clone() for k, v in net.state_dict().items()}


def _worker(rank: int, world: int, root: str, kind: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        shard = Shard(rank, world)
        net = model()
        regions, tokens, mask, same = batch()
        s, e = shard.span(BATCH)
        loss = global_mined_loss(net, regions[s:e], tokens[s:e], mask[s:e], shard, BATCH, 0.2, same, kind)
        loss.backward()
        average_gradients(net.parameters(), shard)
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        torch.save({"loss": loss.item(), "grads": grads, "weights": step(net)},
                   os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def one_process(kind: str):
    net = model()
    regions, tokens, mask, same = batch()
    loss = mined_loss(net, regions, tokens, mask, 0.2, same, kind)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in net.named_parameters()}, step(net)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp(min=1e-12))


@pytest.mark.parametrize("kind", ["max", "sum"])
@pytest.mark.parametrize("world", [2, 3])
def test_every_averaged_gradient_equals_one_process_on_the_whole_batch(tmp_path, world, kind):
    mp.spawn(_worker, args=(world, str(tmp_path), kind), nprocs=world, join=True)
    loss, grads, weights = one_process(kind)
    assert loss > 0 and all(g.norm() > 0 for g in grads.values())  # every parameter gets a gradient
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"] == pytest.approx(loss, rel=1e-6)
        worst = max((relative_error(got["grads"][name], want), name) for name, want in grads.items())
        assert worst[0] < 1e-5, (rank, worst)  # float summation order only; a scale error is >= 1/3
        for name, want in weights.items():
            assert torch.allclose(got["weights"][name], want, rtol=1e-5, atol=1e-5), (rank, name)
