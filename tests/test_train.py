"""Training: it learns, it resumes to the same weights after a kill -9, it detects collapse."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mmca.checkpoint import load_model, read_checkpoint
from mmca.config import ModelConfig, TrainConfig
from mmca.data.dataset import RetrievalDataset, TokenFeatures
from mmca.engine.fused import FusedKernel
from mmca.errors import MmcaError
from mmca.train import Trainer, batch_order, learning_rate

TINY = TrainConfig(
    model=ModelConfig(d=16, heads=2, cnn_filters=8, dropout=0.1),
    epochs=3, batch_size=8, lr=1e-3, lr_decay_epochs=(2,), warmup_epochs=1, save_every_steps=2,
    val_max_rank=None, mirror_images=True,
)


def synthetic_split(num_images: int, seed: int, k: int = 4, img_dim: int = 12, txt_dim: int = 10):
    """A learnable toy split: each caption's tokens are a noisy linear view of its image."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(num_images, k, img_dim)).astype(np.float16)
    view = np.random.default_rng(99).normal(size=(img_dim, txt_dim)) / np.sqrt(img_dim)
    lengths = rng.integers(3, 8, size=num_images * 5)
    states, offsets = [], [0]
    for j, n in enumerate(lengths):
        base = images[j // 5].astype(np.float64).mean(0) @ view
        states.append((base + 0.3 * rng.normal(size=(n, txt_dim))).astype(np.float16))
        offsets.append(offsets[-1] + n)
    return RetrievalDataset(
        name="toy", split=f"s{seed}", image_ids=[str(i) for i in range(num_images)],
        captions=[f"caption {j}" for j in range(num_images * 5)],
        caption_image=np.repeat(np.arange(num_images), 5), captions_per_image=5,
        image_features=images,
        token_features=TokenFeatures(np.concatenate(states), np.asarray(offsets, dtype=np.int64)),
        image_views=((images + 0.2 * rng.normal(size=images.shape)).astype(np.float16),),  # "mirrored"
    )


def train_tiny(out_dir, config=TINY, images=(24, 10), **kw):
    trainer = Trainer(config, synthetic_split(images[0], 1), synthetic_split(images[1], 2), out_dir,
                      progress=False, log=lambda _: None, **kw)
    return trainer, trainer.run()


# Two epochs of three steps, saved every two: each epoch writes last.pt mid-way and at its end.
QUICK = dict(config=TINY.replace(epochs=2, lr_decay_epochs=()), images=(4, 4))


def test_training_learns_and_writes_its_run_directory(tmp_path):
    _, summary = train_tiny(tmp_path)
    history = summary["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["loss_kind"] for r in history] == ["sum", "max", "max"]
    assert history[-1]["lr"] == pytest.approx(1e-4)
    assert max(r["rsum"] for r in history) > 200  # 10 toy images: chance rsum is ~ 130
    for name in ("config.json", "last.pt", "best.pt", "log.csv", "curves.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "log.csv").read_text().count("\n") == 4
    _, extra = load_model(tmp_path / "best.pt")
    assert extra["metrics"]["rsum"] == summary["best_rsum"]


def test_existing_run_needs_resume(tmp_path):
    train_tiny(tmp_path)
    with pytest.raises(MmcaError, match="--resume"):
        train_tiny(tmp_path)


def test_resume_with_another_config_is_refused(tmp_path):
    train_tiny(tmp_path)
    with pytest.raises(MmcaError, match="another configuration"):
        train_tiny(tmp_path, config=TINY.replace(lr=5e-4), resume=True)


CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads({threads})  # float reductions depend on the thread count
    sys.path.insert(0, {tests!r})
    from test_train import train_tiny
    from mmca.train import Trainer
    step = Trainer._train_step
    count = 0
    def dying_step(self, captions, kind):
        global count
        count += 1
        if count == {die_at}:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no chance to write anything
        return step(self, captions, kind)
    Trainer._train_step = dying_step
    train_tiny({out!r})
""")


def test_mirrored_views_are_drawn_per_step_and_required(tmp_path):
    trainer, _ = train_tiny(tmp_path / "a")
    trainer.state.epoch, trainer.state.step = 1, 3
    drawn = trainer._image_views(64)
    assert set(drawn.tolist()) == {0, 1}  # about half the images mirrored
    np.testing.assert_array_equal(drawn, trainer._image_views(64))  # a function of (seed, epoch, step)
    trainer.state.step = 4
    assert not np.array_equal(drawn, trainer._image_views(64))
    bare = synthetic_split(24, 1)
    bare.image_views = ()
    with pytest.raises(MmcaError, match="no mirrored views"):
        Trainer(TINY, bare, synthetic_split(10, 2), tmp_path / "b", progress=False)
    plain, _ = train_tiny(tmp_path / "c", config=TINY.replace(mirror_images=False))
    assert plain._image_views(8) is None


def test_killed_run_resumes_to_the_same_final_weights(tmp_path):
    straight, _ = train_tiny(tmp_path / "straight")
    # 15 batches per epoch, a save every 2: die in epoch 2 at its 5th batch, one batch after a save.
    script = CHILD.format(tests=os.path.dirname(__file__), die_at=20, out=str(tmp_path / "killed"),
                          threads=torch.get_num_threads())
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    state = read_checkpoint(tmp_path / "killed" / "last.pt")["state"]
    assert '"epoch": 1' in state  # it had finished epoch 1 and was mid-way through epoch 2
    resumed, _ = train_tiny(tmp_path / "killed", resume=True)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert _untimed(resumed.state.history) == _untimed(straight.state.history)


def _untimed(history: list[dict]) -> list[dict]:
    """A run's history without its timings, which differ between any two runs."""
    return [{k: v for k, v in row.items() if k not in ("train_s", "val_s")} for row in history]


def test_staged_run_trains_alpha0_first_and_keeps_the_full_model(tmp_path):
    """cross_from_epoch: the first epochs are exactly the α = 0 run, the cross module is
    untouched until it switches on, and best.pt comes from an epoch with the cross module."""
    staged = TINY.replace(cross_from_epoch=2, warmup_epochs=1)
    trainer = Trainer(staged, synthetic_split(24, 1), synthetic_split(10, 2), tmp_path / "staged",
                      progress=False, log=lambda _: None)
    cross_init = {k: v.clone() for k, v in trainer.model.state_dict().items() if k.startswith("cross_unit")}
    trainer.run(until_epoch=2)  # stop at the switch to inspect the α = 0 stage
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in cross_init.items())
    ablation, _ = train_tiny(tmp_path / "a0", config=TINY.replace(epochs=2, model_alpha=0.0))
    for a, b in zip(trainer.model.state_dict().values(), ablation.model.state_dict().values()):
        assert torch.equal(a, b)
    assert not (tmp_path / "staged" / "best.pt").exists()  # no full-model epoch yet
    summary = trainer.run()
    assert [r["alpha"] for r in summary["history"]] == [0.0, 0.0, TINY.model.alpha]
    assert read_checkpoint(tmp_path / "staged" / "best.pt")["epoch"] == 3


def test_collapse_is_detected_and_logged(tmp_path):
    logged = []
    collapsed = TINY.replace(epochs=2, warmup_epochs=0, lr=0.0)  # lr 0: scores never separate
    config = collapsed.replace(model_alpha=0.0)
    trainer = Trainer(config, synthetic_split(24, 1), synthetic_split(10, 2), tmp_path,
                      progress=False, log=logged.append)
    with torch.no_grad():  # a collapsed model: every embedding identical, every score equal
        for p in trainer.model.parameters():
            p.zero_()
    trainer.run()
    assert all(r["collapsed"] for r in trainer.state.history)
    assert any("collapsed" in line for line in logged)
    assert any("training is collapsing" in line for line in logged)  # mid-epoch, before validation


def test_data_order_depends_only_on_seed_and_epoch():
    a = batch_order(100, 8, seed=3, epoch=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, batch_order(100, 8, seed=3, epoch=2)))
    assert not np.array_equal(a[0], batch_order(100, 8, seed=3, epoch=3)[0])
    assert sorted(np.concatenate(a)) == list(range(100))


def test_learning_rate_schedule_is_the_papers():
    paper = TrainConfig()
    assert learning_rate(paper, 9) == pytest.approx(2e-4)
    assert learning_rate(paper, 10) == pytest.approx(2e-5)


def test_training_stops_on_a_nan_gradient_without_stepping(tmp_path):
    trainer = Trainer(TINY.replace(epochs=1), synthetic_split(24, 1), synthetic_split(10, 2), tmp_path,
                      progress=False, log=lambda _: None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.model.region_fc.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(MmcaError, match="gradient became nan.*last good state"):
        trainer.run()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the poisoned step was not applied


def test_training_says_which_precision_it_mines_in(monkeypatch, tmp_path):
    import json

    from mmca import hardware
    from mmca.engine import precision

    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})  # a CPU that emulates bf16
    precision._auto.cache_clear()
    lines = []
    trainer = Trainer(TINY.replace(epochs=1), synthetic_split(8, 1), synthetic_split(6, 2), tmp_path,
                      progress=False, log=lines.append)
    precision._auto.cache_clear()
    assert trainer.mining.precision == "fp32"
    assert any("mining in fp32 (auto: CPU capability" in line and "emulated" in line for line in lines)
    assert json.loads((tmp_path / "config.json").read_text())["mining"]["precision"] == "fp32"


def test_a_staged_run_branched_from_its_ablation_equals_one_that_trained_the_prefix(tmp_path):
    from mmca.train import prefix_config

    staged = TINY.replace(epochs=3, cross_from_epoch=2, lr_decay_epochs=(2,))
    full = train_tiny(tmp_path / "full", staged)[0]
    ablation = Trainer(prefix_config(staged), synthetic_split(24, 1), synthetic_split(10, 2), tmp_path / "a0",
                       progress=False, log=lambda _: None)
    ablation.run(until_epoch=2)
    branch = tmp_path / "prefix.pt"
    branch.write_bytes(ablation.last_path.read_bytes())
    ablation.run()  # the ablation goes on to its end, unaffected
    branched, summary = train_tiny(tmp_path / "branched", staged, branch_from=branch)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, branched.model.state_dict()[k]), k
    untimed = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # noqa: E731
    assert untimed(summary["history"]) == untimed(full.state.history)
    assert summary["best_epoch"]["epoch"] == 3
    with pytest.raises(MmcaError, match="another configuration"):  # a prefix of another recipe
        train_tiny(tmp_path / "wrong", staged.replace(seed=5), branch_from=branch)


def test_resume_says_which_options_differ_and_keeps_its_mining_precision(tmp_path):
    trainer, _ = train_tiny(tmp_path, TINY.replace(epochs=1))
    with pytest.raises(MmcaError, match=r"another configuration .*epochs: 1 vs 2"):
        train_tiny(tmp_path, TINY.replace(epochs=2), resume=True)
    assert read_checkpoint(tmp_path / "last.pt")["mining_precision"] == trainer.mining.precision


def test_impossible_or_stale_runs_are_refused_before_training(tmp_path):
    from mmca.errors import ConfigError

    with pytest.raises(ConfigError, match="no epoch would train the full model"):
        TINY.replace(epochs=2, cross_from_epoch=2)
    TINY.replace(epochs=2, cross_from_epoch=2, model_alpha=0.0)  # the ablation: every epoch counts
    train_tiny(tmp_path, TINY.replace(epochs=1))
    (tmp_path / "last.pt").unlink()
    with pytest.raises(MmcaError, match="best.pt but no last.pt"):
        train_tiny(tmp_path, TINY.replace(epochs=1))


def test_an_ablation_with_a_staged_schedule_keeps_its_best_epoch(tmp_path):
    _, summary = train_tiny(tmp_path, TINY.replace(epochs=2, cross_from_epoch=1, model_alpha=0.0))
    best = max(summary["history"], key=lambda r: r["rsum"])
    assert summary["best_epoch"]["epoch"] == best["epoch"]


REAL_REPLACE = os.replace


class Killed(BaseException):
    """Stands in for a kill: a BaseException, so no `except Exception` in mmca stops it."""


def kill_after_write(monkeypatch, run_dir, n: int | None) -> list[str]:
    """Make the n-th file the run writes into `run_dir` its last act. Every file mmca writes
    goes through `atomic_write`, whose rename is `os.replace`: counting renames counts writes,
    and raising right after the n-th is a process that died there (the test process goes on
    to resume it). n=None: only record the names written, in order."""
    written = []

    def replace(src, dst):
        REAL_REPLACE(src, dst)
        if os.path.dirname(os.fspath(dst)) == str(run_dir):
            written.append(os.path.basename(dst))
            if len(written) == n:
                raise Killed(dst)

    monkeypatch.setattr(os, "replace", replace)
    return written


def run_files(run_dir):
    """What a finished run holds, for comparison: weights of last.pt and best.pt, best.pt's
    epoch and metrics, and log.csv without its timings."""
    import csv

    last, best = read_checkpoint(run_dir / "last.pt"), read_checkpoint(run_dir / "best.pt")
    with open(run_dir / "log.csv") as f:
        log = [{k: v for k, v in row.items() if not k.endswith("_s")} for row in csv.DictReader(f)]
    return last["model"], best["model"], best["epoch"], best["metrics"], log


def test_a_run_killed_after_any_write_resumes_to_the_same_files(monkeypatch, tmp_path):
    straight = tmp_path / "straight"
    writes = kill_after_write(monkeypatch, straight, None)
    train_tiny(straight, **QUICK)
    expected = run_files(straight)
    assert writes.count("last.pt") == 4 and "best.pt" in writes and writes[-1] == "curves.png"
    for n, name in enumerate(writes, 1):
        run_dir = tmp_path / f"killed-{n}"
        kill_after_write(monkeypatch, run_dir, n)
        with pytest.raises(Killed):
            train_tiny(run_dir, **QUICK)
        assert not (run_dir / "best.pt").exists() or (run_dir / "last.pt").exists(), name
        kill_after_write(monkeypatch, run_dir, None)
        train_tiny(run_dir, resume=True, **QUICK)
        got = run_files(run_dir)
        for mine, theirs in ((got[0], expected[0]), (got[1], expected[1])):
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs), f"killed after write {n} ({name})"
        assert got[2:] == expected[2:], f"killed after write {n} ({name})"


KILLED_IN_WRITE = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads({threads})
    sys.path.insert(0, {tests!r})
    from test_train import QUICK, train_tiny
    real = os.replace
    def replace(src, dst):
        if os.path.basename(dst) == "best.pt":  # its temporary file is complete, not yet renamed
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    os.replace = replace
    train_tiny({out!r}, **QUICK)
""")


def test_a_kill_before_the_first_best_pt_leaves_a_run_that_resumes_and_is_swept(tmp_path):
    straight, _ = train_tiny(tmp_path / "straight", **QUICK)
    run_dir = tmp_path / "killed"
    script = KILLED_IN_WRITE.format(tests=os.path.dirname(__file__), out=str(run_dir),
                                    threads=torch.get_num_threads())
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    stale = [p.name for p in run_dir.iterdir() if p.name.startswith(".best.pt.")]
    assert len(stale) == 1 and not (run_dir / "best.pt").exists() and (run_dir / "last.pt").exists()
    (run_dir / ".best.pt.notes.tmp").write_text("not mmca's: another name pattern")
    lines = []
    resumed = Trainer(QUICK["config"], synthetic_split(4, 1), synthetic_split(4, 2), run_dir,
                      resume=True, progress=False, log=lines.append)
    assert any(f"removed {stale[0]}" in line for line in lines)
    assert not (run_dir / stale[0]).exists() and (run_dir / ".best.pt.notes.tmp").exists()
    assert read_checkpoint(run_dir / "best.pt")["epoch"] == 1  # written from last.pt's record
    resumed.run()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_resume_on_other_data_is_refused_saying_what_differs(tmp_path):
    config = QUICK["config"].replace(epochs=1)
    train, dev = synthetic_split(4, 1), synthetic_split(4, 2)
    train.root = tmp_path / "flickr"
    Trainer(config, train, dev, tmp_path / "run", progress=False, log=lambda _: None).run()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["train"]["captions"] == 20
    other = synthetic_split(4, 1)  # the same features, other sentences: another dataset
    other.root, other.captions = tmp_path / "other", [f"a dog {j}" for j in range(20)]
    with pytest.raises(MmcaError, match=r"trained on other data .*train split: root: '.*flickr' vs '.*other'; "
                                        r"digest: '[0-9a-f]{12}…' vs"):
        Trainer(config, other, dev, tmp_path / "run", resume=True, progress=False)
    fewer = synthetic_split(3, 2)  # a validation split with one image less
    with pytest.raises(MmcaError, match=r"val split: images: 4 vs 3; captions: 20 vs 15"):
        Trainer(config, train, fewer, tmp_path / "run", resume=True, progress=False)
    moved = synthetic_split(4, 1)  # the same content in another folder: the data was moved
    moved.root = tmp_path / "moved"
    Trainer(config, moved, dev, tmp_path / "run", resume=True, progress=False, log=lambda _: None).run()


def test_a_resumed_run_keeps_its_feature_spec_names_included(tmp_path):
    from dataclasses import replace

    from mmca.data.spec import FeatureSpec, ImageSpec, TextSpec

    found_by_name = FeatureSpec(ImageSpec("mobilenet_v2", 4, 12, grid=2, image_size=64, weights_sha256="ab"),
                                TextSpec("bert", 10, 64, "cd", "model.safetensors:1", "/models/minilm", "minilm"))
    config = QUICK["config"]

    def split(seed, spec):
        data = synthetic_split(4, seed)
        data.feature_spec = spec
        return data

    Trainer(config, split(1, found_by_name), split(2, found_by_name), tmp_path, progress=False,
            log=lambda _: None).run(until_epoch=1)
    by_folder = replace(found_by_name, text=replace(found_by_name.text, name=None))  # how a resume finds it
    resumed = Trainer(config, split(1, by_folder), split(2, by_folder), tmp_path, resume=True,
                      progress=False, log=lambda _: None)
    resumed.run()
    for spec in (json.loads((tmp_path / "config.json").read_text())["feature_spec"],
                 read_checkpoint(tmp_path / "last.pt")["feature_spec"]):
        assert spec["text"]["name"] == "minilm" and spec["text"]["model_dir"] == "/models/minilm"


def test_training_never_fuses_only_the_shapes_something_else_compiled(tmp_path, monkeypatch):
    """Under the default switch ("warm") a run would fuse the block shapes that a benchmark or
    another job compiled earlier and score the rest eagerly: its numbers would depend on the
    kernel cache. Every engine a run builds is "off" unless fusing is asked for everywhere."""
    modes = []
    real = FusedKernel.ready
    monkeypatch.setattr(FusedKernel, "ready", lambda self, shape: modes.append(self.mode) or real(self, shape))
    monkeypatch.setenv("MMCA_FUSED_KERNEL", "warm")
    train_tiny(tmp_path, TINY.replace(epochs=1))
    assert modes and set(modes) == {"off"}
