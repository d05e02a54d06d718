"""The fused (compiled) pair kernel against the eager engine and the plain reference path, with
the bound pruning most pairs; its compiled code cached on disk for the next process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import make_gallery

from mmca.config import ModelConfig
from mmca.engine import ScoringEngine
from mmca.engine.fused import FusedKernelError, fused_mode
from mmca.model import MMCA, reference_score

# every test here shares one cold compile of the kernel (~30 s on 2 cores)
pytestmark = pytest.mark.slow

# α small next to the spread of i0·c0: the bound decides most pairs (as in test_engine)
CONFIG = ModelConfig(img_dim=24, txt_dim=20, d=32, heads=4, cnn_filters=16, dropout=0.0, alpha=0.02)
# one caption bucket (lengths 1..11 padded to 12) and one block shape: a single compile
ENGINE = dict(block_pairs=16, length_granule=12)


@pytest.fixture(scope="module")
def fused_setup(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mmca-cache")
    torch.manual_seed(0)
    model = MMCA(CONFIG).eval()
    regions, tokens, mask, ci = make_gallery(CONFIG, ties=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMCA_CACHE_DIR", str(cache))
        fused = ScoringEngine(model, fused="on", **ENGINE)
        eager = ScoringEngine(model, fused="off", **ENGINE)
    banks = fused.image_bank(regions), fused.text_bank((tokens, mask))
    return model, fused, eager, banks, (regions, tokens, mask, ci), cache


def test_fused_scores_equal_the_eager_engine_and_the_reference(fused_setup):
    model, fused, eager, (images, texts), (regions, tokens, mask, _), _ = fused_setup
    got, want = fused.full_scores(images, texts), eager.full_scores(images, texts)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    for a, b in ((0, 0), (3, 17), (11, 59)):
        n = int(mask[b].sum())
        assert got[a, b].item() == pytest.approx(reference_score(model, regions[a], tokens[b, :n]), abs=1e-5)


def test_fused_scores_are_block_independent(fused_setup):
    """A pair scores the same floats whatever fused block it falls in (a second block shape)."""
    model, fused, _, (images, texts), _, cache = fused_setup
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMCA_CACHE_DIR", str(cache))
        wider = ScoringEngine(model, fused="on", **{**ENGINE, "block_pairs": 48})
    assert torch.equal(wider.full_scores(images, texts, image_block=5), fused.full_scores(images, texts))


def test_fused_pruned_ranks_are_bit_identical(fused_setup):
    _, fused, eager, (images, texts), (*_, ci), _ = fused_setup
    ex = fused.ranks(images, texts, ci, mode="exhaustive")
    pr = fused.ranks(images, texts, ci, mode="exact")
    assert pr.pair_passes < 0.6 * ex.pair_passes  # the bound decided most pairs
    assert np.array_equal(ex.i2t, pr.i2t) and np.array_equal(ex.t2i, pr.t2i)
    ref = eager.ranks(images, texts, ci, mode="exhaustive")
    assert np.array_equal(ref.i2t, pr.i2t) and np.array_equal(ref.t2i, pr.t2i)
    for k in (1, 5):
        s_ex, i_ex = fused.topk_images(images, texts, k, mode="exhaustive")
        s_pr, i_pr = fused.topk_images(images, texts, k)
        assert torch.equal(s_ex, s_pr) and torch.equal(i_ex, i_pr)


WARM_CHILD = """
import json, sys, torch
from torch._dynamo.utils import counters
from mmca.config import ModelConfig
from mmca.engine import ScoringEngine
from mmca.model import MMCA
from test_engine import make_gallery
from test_fused import CONFIG, ENGINE
torch.manual_seed(0)
model = MMCA(CONFIG).eval()
regions, tokens, mask, ci = make_gallery(CONFIG, ties=False)
eng = ScoringEngine(model, **ENGINE)  # MMCA_FUSED_KERNEL decides
s = eng.full_scores(eng.image_bank(regions), eng.text_bank((tokens, mask)))
print(json.dumps({"hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"], "scores": s.tolist()}))
"""


def test_a_new_process_loads_the_warm_kernel_from_disk(fused_setup, tmp_path):
    """One process compiles into an empty kernel cache, the next loads it: both run in fresh
    processes, since inductor's cache folder is fixed by a process's first compile."""
    _, fused, _, (images, texts), _, _ = fused_setup
    root = Path(__file__).resolve().parents[2]
    path = os.pathsep.join([str(root / "src"), str(root / "tests" / "engine")])
    env = dict(os.environ, MMCA_CACHE_DIR=str(tmp_path), PYTHONPATH=path)

    def child(mode: str | None) -> dict:
        run_env = {k: v for k, v in env.items() if k != "MMCA_FUSED_KERNEL"}
        if mode:
            run_env["MMCA_FUSED_KERNEL"] = mode
        res = subprocess.run([sys.executable, "-c", WARM_CHILD], capture_output=True, text=True, env=run_env,
                             cwd=root)
        assert res.returncode == 0, res.stderr[-2000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    cold = child("on")  # compiles and marks the shape warm
    markers = list((tmp_path / "inductor" / torch.__version__ / "warm").glob("*.json"))
    assert len(markers) == 1 and json.loads(markers[0].read_text())["pairs"] == 16
    assert cold["misses"] >= 1
    warm = child(None)  # the default switch: fused where warm
    assert warm["hits"] >= 1 and warm["misses"] == 0  # loaded, not compiled again
    assert torch.equal(torch.tensor(warm["scores"]), torch.tensor(cold["scores"]))  # and the same floats
    assert torch.allclose(torch.tensor(warm["scores"]), fused.full_scores(images, texts), atol=1e-6, rtol=0)


def test_the_switch_refuses_an_unknown_mode(monkeypatch):
    monkeypatch.setenv("MMCA_FUSED_KERNEL", "fast")
    with pytest.raises(FusedKernelError) as err:
        fused_mode()
    assert "off, warm, on" in err.value.hint
    monkeypatch.setenv("MMCA_FUSED_KERNEL", "OFF")
    assert fused_mode() == "off"
