"""torch.distributed with real 2-process gloo groups (spawned here, a few seconds): sharded
evaluation equals one process bit for bit, and the process group is set up from torchrun's
environment or refused with a clear error."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmca.config import ModelConfig
from mmca.data.dataset import RetrievalDataset, TokenFeatures
from mmca.dist import Shard, init_from_env
from mmca.errors import MmcaError
from mmca.evaluate import Protocol, evaluate
from mmca.model import MMCA

CASES = [dict(mode="exact", max_rank=None), dict(mode="exact", max_rank=10), dict(mode="exhaustive", max_rank=None),
         dict(mode="shortlist", max_rank=None, shortlist_k=7), dict(mode="exact", max_rank=10, ties="argsort")]
FOLDS = Protocol("folds", "3 folds of 4 images", images=12, fold_size=4)


def gallery(seed: int = 0) -> RetrievalDataset:
    rng = np.random.default_rng(seed)
    n, cpi = 12, 5
    lengths = rng.integers(3, 10, size=n * cpi)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    states = rng.standard_normal((offsets[-1], 12)).astype(np.float16)
    images = rng.standard_normal((n, 4, 8)).astype(np.float32)
    images[1] = images[0]  # tied scores: the tie conventions must hold across ranks too
    return RetrievalDataset(name="g", split="dev", image_ids=[str(i) for i in range(n)],
                            captions=[f"c{j}" for j in range(n * cpi)], caption_image=np.repeat(np.arange(n), cpi),
                            captions_per_image=cpi, image_features=images,
                            token_features=TokenFeatures(states, offsets))


def model() -> MMCA:
    torch.manual_seed(0)
    return MMCA(ModelConfig(img_dim=8, txt_dim=12, d=32, heads=4, cnn_filters=8, dropout=0.0)).eval()


def run_cases(shard: Shard | None) -> list[dict]:
    out = []
    for case in CASES:
        for protocol in ("full", FOLDS):
            r = evaluate(model(), gallery(), protocol, device="cpu", shard=shard, **case)
            out.append({"metrics": r.metrics, "folds": r.folds, "passes": r.pair_passes})
    return out


def _worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        result = run_cases(Shard(rank, world))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process_bit_for_bit(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    single = json.loads(json.dumps(run_cases(None)))
    for rank in (0, 1):
        sharded = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for one, many, case in zip(single, sharded, [c for c in CASES for _ in (0, 1)]):
            assert many["metrics"] == one["metrics"] and many["folds"] == one["folds"], case
            if case.get("max_rank") is None:  # every pair once, whichever rank scores it
                assert many["passes"] == one["passes"], case
            else:  # each rank keeps its own score cache: a pair both directions need may be scored twice
                assert one["passes"] <= many["passes"] <= 2 * one["passes"], case


def test_the_single_shard_is_the_plain_path(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    shard = init_from_env()
    assert shard == Shard() and shard.main and shard.span(10) == (0, 10) and not dist.is_initialized()
    assert [Shard(r, 3).span(10) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_a_missing_rendezvous_variable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(MmcaError, match="(?s)LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set.*torchrun"):
        init_from_env()


def precomp_dataset(root, rng) -> None:
    """Tiny precomp splits (train: 16 images, dev: 8; 5 real-ish captions each)."""
    root.mkdir()
    words = ["dog", "cat", "beach", "snow", "red", "man", "runs", "sits"]
    for split, n in (("train", 16), ("dev", 8)):
        np.save(root / f"{split}_ims.npy", rng.standard_normal((n, 4, 8)).astype(np.float32))
        (root / f"{split}_caps.txt").write_text(
            "".join(f"a {words[i % 8]} {words[(i + j) % 8]} {j}\n" for i in range(n) for j in range(5)))


def run_mmca(*argv, ranks: int = 1, env=None):
    import subprocess
    import sys

    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*launcher, "-m", "mmca", *map(str, argv)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def precomp(tmp_path_factory):
    """A tiny precomp dataset and its feature cache, filled here once (in this process: the
    commands under test then start without encoding captions)."""
    from mmca.features.prepare import open_dataset

    base = tmp_path_factory.mktemp("precomp")
    root, cache = base / "precomp", base / "cache"
    precomp_dataset(root, np.random.default_rng(0))
    for split in ("train", "dev"):
        open_dataset(root, split, cache_dir=cache, progress=False)
    return root, cache


def test_torchrun_evaluate_writes_the_single_process_result(tmp_path, precomp):
    """`torchrun --nproc-per-node 2 -m mmca evaluate` end to end: one results file, equal to
    the plain command's."""
    from mmca.checkpoint import save_checkpoint
    from mmca.data.spec import FeatureSpec, precomp_image_spec, text_spec
    from mmca.features import TextEncoder

    root, cache = precomp
    spec = FeatureSpec(precomp_image_spec(root / "dev_ims.npy", (8, 4, 8), "float32"), text_spec(TextEncoder("minilm")))
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "run" / "best.pt",
                           MMCA(ModelConfig(img_dim=8, txt_dim=384, d=32, heads=4, cnn_filters=8)), spec)
    common = ["evaluate", root, "--checkpoint", ckpt, "--cache", cache, "--device", "cpu"]
    run_mmca(*common, "--out", tmp_path / "one.json")
    printed = run_mmca(*common, "--out", tmp_path / "two.json", ranks=2)
    assert printed.count("results:") == 1  # one rank prints
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["metrics"] == two["metrics"] and one["pair_passes"] <= two["pair_passes"]


def test_torchrun_train_equals_the_plain_command(tmp_path, precomp):
    from mmca.checkpoint import read_checkpoint

    root, cache = precomp
    common = ["train", root, "--preset", "cpu", "--epochs", "2", "--cross-from-epoch", "1", "--mirror-images", "off",
              "--hidden", "16", "--heads", "2", "--batch-size", "16", "--dropout", "0", "--cache", cache,
              "--no-progress"]
    run_mmca(*common, "--out", tmp_path / "one")
    printed = run_mmca(*common, "--out", tmp_path / "two", ranks=2)
    assert printed.count("best epoch") == 1
    one, two = (read_checkpoint(tmp_path / n / "last.pt") for n in ("one", "two"))
    # 10 steps, the cross module at 10x the lr (2e-3): float noise grows a little past 1e-5
    assert_same_weights(one["model"], two["model"], atol=1e-4)


# ---------------------------------------------------------------------------- training

def train_config():
    from mmca.config import TrainConfig

    return TrainConfig(model=ModelConfig(d=16, heads=2, cnn_filters=8, dropout=0.0), epochs=2, batch_size=40,
                       lr=1e-3, lr_decay_epochs=(), warmup_epochs=1, save_every_steps=2, val_max_rank=None,
                       mirror_images=True)  # 120 captions: 3 steps an epoch, the sum loss, then hardest negatives


def trainer(out_dir, shard=None, resume=False):
    from mmca.train import Trainer
    from test_train import synthetic_split

    return Trainer(train_config(), synthetic_split(24, 1), synthetic_split(10, 2), out_dir, resume=resume,
                   progress=False, log=lambda _: None, shard=shard)


def _train_worker(rank: int, world: int, rendezvous: str, root: str) -> None:
    """Every 2-rank training scenario in one process group (one spawn: the tests stay fast)."""
    import shutil
    from pathlib import Path

    torch.set_num_threads(1)
    root = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        shard = Shard(rank, world)
        trainer(root / "two", shard).run()  # uninterrupted
        trainer(root / "a", shard).run(until_epoch=1)  # stopped after epoch 1...
        shard.barrier()
        if shard.main:  # (b: the same stopped run, to be resumed by one process)
            shutil.copytree(root / "a", root / "b")
        shard.barrier()
        trainer(root / "a", shard, resume=True).run()  # ...resumed by the same 2 ranks
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Runs trained by 2 gloo ranks: `two` (whole), `a` (stopped, resumed by 2 ranks), `b` (stopped)."""
    root = tmp_path_factory.mktemp("two-ranks")
    mp.spawn(_train_worker, args=(2, str(root / "rendezvous"), str(root)), nprocs=2, join=True)
    return root


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same run trained by one process."""
    one = trainer(tmp_path_factory.mktemp("one-process"))
    one.run()
    return one


def assert_same_weights(a: dict, b: dict, d: int = 16, atol: float = 1e-5) -> None:
    """allclose 1e-5, except the key part of each attention's qkv bias: adding b_k to every key
    adds q·b_k to a whole row of logits, which the softmax cancels, so its exact gradient is 0 and
    Adam turns the float noise there (~1e-9) into steps of up to lr either way."""
    for k, v in a.items():
        w = b[k]
        if k.endswith("qkv.bias"):
            v, w = torch.cat([v[:d], v[2 * d:]]), torch.cat([w[:d], w[2 * d:]])
        assert torch.allclose(v, w, atol=atol, rtol=0), (k, float((v - w).abs().max()))


def test_two_ranks_train_as_one_process(two_ranks, one_process):
    from mmca.checkpoint import read_checkpoint

    two = read_checkpoint(two_ranks / "two" / "last.pt")
    assert_same_weights(one_process.model.state_dict(), two["model"])  # 6 optimizer steps, mining included
    history = json.loads(two["state"])["history"]
    assert [r["loss_kind"] for r in history] == ["sum", "max"]
    assert [r["rsum"] for r in history] == pytest.approx([r["rsum"] for r in one_process.state.history], abs=1e-6)
    assert sorted(p.name for p in (two_ranks / "two").iterdir()) == \
        sorted(p.name for p in one_process.out_dir.iterdir())


def test_a_distributed_run_resumes_with_the_same_or_another_world_size(two_ranks, one_process):
    from mmca.checkpoint import read_checkpoint

    whole = one_process.model.state_dict()
    assert_same_weights(whole, read_checkpoint(two_ranks / "a" / "last.pt")["model"])  # resumed by 2 ranks
    resumed = trainer(two_ranks / "b", resume=True)  # resumed by one process: same global batch
    resumed.run()
    assert_same_weights(whole, resumed.model.state_dict())
