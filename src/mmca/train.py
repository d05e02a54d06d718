"""Training: hardest-negative triplet loss through the engine's mine-then-recompute path,
validation on dev after every epoch, best checkpoint by dev rsum, and exact resumption.

A run directory (a folder of kind `run`, `mmca.folders`) holds `config.json`, `last.pt`
(everything needed to resume, rewritten every `save_every_steps` steps and at each epoch end),
`best.pt`, `log.csv` and `curves.png`.
Data order depends only on (seed, epoch), and the RNG state is checkpointed, so a resumed run
ends with the same weights as an uninterrupted one.

Every file is written atomically, and at an epoch's end `last.pt` comes first: it records
which epoch is best (and that epoch's metrics), so a run killed before `best.pt` or `log.csv`
were rewritten writes them on resume from the state it holds. Whatever instant a kill hits,
the folder resumes; temporary files a kill left are swept at the next start. `last.pt` and
`config.json` also record the identity of the train and validation data (`SplitIdentity`):
a resume on other data is refused.
"""

from __future__ import annotations

import csv
import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from mmca.atomic import atomic_write, atomic_write_text, stale_temps
from mmca.checkpoint import checkpoint_spec, read_checkpoint, save_checkpoint
from mmca.config import TrainConfig
from mmca.data.dataset import RetrievalDataset
from mmca.data.identity import SplitIdentity, shared_images
from mmca.dist import Shard
from mmca.engine import mined_loss
from mmca.engine.bank import pad_tokens
from mmca.engine.fused import fused_mode
from mmca.engine.global_batch import average_gradients, global_mined_loss
from mmca.engine.precision import PrecisionChoice, resolve_precision
from mmca.errors import MmcaError
from mmca.evaluate import evaluate
from mmca.extras import missing
from mmca.folders import MARKER, mark, require_writable
from mmca.model import MMCA

LOG_FIELDS = ["epoch", "loss", "loss_kind", "lr", "train_s", "val_s",
              "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "collapsed", "alpha"]
CROSS_MODULES = ("token_fc", "cross_unit", "cross_text_head")
# what a run folder holds: the names whose stale temporary files a start may sweep
RUN_FILES = ("config.json", "last.pt", "best.pt", "log.csv", "curves.png", MARKER)
REMEDIES = ("Try --warmup-epochs 1, a lower --cross-lr-scale, or --cross-from-epoch N "
            "(train α = 0 first), as the cpu preset does.")


@dataclass
class TrainState:
    """Progress that must survive an interruption."""

    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # batches of that epoch already done
    loss_sum: float = 0.0  # running sum over those batches
    best_rsum: float = -1.0
    best_epoch: int = 0  # the epoch best.pt holds (1-based; 0: none yet)
    best_metrics: dict | None = None  # its dev metrics, to write best.pt again after a kill
    history: list[dict] = field(default_factory=list)


def batch_order(num_captions: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The caption batches of one epoch: a permutation that depends only on (seed, epoch)."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_captions)
    batches = [perm[i:i + batch_size] for i in range(0, num_captions, batch_size)]
    return [b for b in batches if len(b) > 1]  # a lone pair has no negatives


def learning_rate(config: TrainConfig, epoch: int) -> float:
    return config.lr * config.lr_decay ** sum(epoch >= e for e in config.lr_decay_epochs)


def build_optimizer(model: MMCA, config: TrainConfig) -> torch.optim.Adam:
    """Adam with the cross-attention module in a group of its own (its lr may be scaled)."""
    cross = [p for name, p in model.named_parameters() if name.split(".")[0] in CROSS_MODULES]
    cross_ids = {id(p) for p in cross}
    rest = [p for p in model.parameters() if id(p) not in cross_ids]
    return torch.optim.Adam([{"params": rest, "lr_scale": 1.0},
                             {"params": cross, "lr_scale": config.cross_lr_scale}],
                            lr=config.lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def collapse_floor(config: TrainConfig) -> float:
    """Loss of a collapsed model (every score equal) with hardest negatives: 2·B·margin."""
    return 2 * config.batch_size * config.margin


class Trainer:
    """One training run in `out_dir`; `run()` trains to the end, resuming if asked."""

    def __init__(self, config: TrainConfig, train_set: RetrievalDataset, dev_set: RetrievalDataset,
                 out_dir: str | Path, device: str | torch.device = "cpu", resume: bool = False,
                 init_from: str | Path | None = None, branch_from: str | Path | None = None,
                 progress: bool = True, log: Callable[[str], None] = print, shard: Shard | None = None):
        """`branch_from`: the last.pt of this run's α = 0 ablation saved at the end of epoch
        `cross_from_epoch` (see `prefix_config`): the staged run's first epochs are that
        run's, bit for bit, so they are taken from it instead of trained again.
        `shard`: this rank of a data-parallel run (`mmca.dist`): every global batch is split
        over the ranks, the loss and gradient are one process's (`engine.global_batch`), rank 0
        alone writes files and logs."""
        self.shard = shard or Shard()
        if not self.shard.main:
            log, progress = (lambda _: None), False
        self.config = config.replace(model_img_dim=int(train_set.image_features.shape[2]),
                                     model_txt_dim=train_set.token_features.dim)
        if self.config.mirror_images and not train_set.image_views:
            raise MmcaError(f"mirror_images is on but the {train_set.split} split has no mirrored views",
                            "open the split with mirror=True (the CLI does), or turn mirror_images off")
        self.train_set, self.dev_set = train_set, dev_set
        self.data = {"train": SplitIdentity.of(train_set), "val": SplitIdentity.of(dev_set)}
        if self.shard.main:
            _warn_if_shared(train_set, dev_set)
        self.spec = train_set.spec.with_mirror(self.config.mirror_images)
        self.spec.require_match(dev_set.spec, f"the {train_set.split} split", f"the {dev_set.split} split",
                                "prepare both splits with the same --backbone, --image-size, --grid and --text-encoder")
        self.out_dir, self.device = Path(out_dir), torch.device(device)
        if self.shard.main:
            require_writable(self.out_dir, "run")  # an empty folder or a run, never a user's folder
        self.progress, self.log = progress, log
        self.last_path, self.best_path = self.out_dir / "last.pt", self.out_dir / "best.pt"

        self.mining = resolve_precision(self.config.mining_precision, self.device)
        # A run's numbers must not depend on which kernel shapes something else compiled before
        # ("warm" fuses only those): training fuses every shape or none.
        self.fused = "on" if fused_mode() == "on" else "off"
        torch.manual_seed(self.config.seed)
        self.model = MMCA(self.config.model).to(self.device)
        self.optimizer = build_optimizer(self.model, self.config)
        self.state = TrainState()
        if self.best_path.exists() and not self.last_path.exists():
            raise MmcaError(f"{self.out_dir} holds a best.pt but no last.pt (a run whose state was removed)",
                            "choose another --out directory, or move that best.pt away")
        if self.last_path.exists():
            if not resume:
                raise MmcaError(f"{self.out_dir} already holds a run (last.pt)",
                                "pass --resume to continue it, or choose another --out directory")
            self._restore()
        elif branch_from is not None:
            self._branch(Path(branch_from))
        elif init_from is not None:
            self._init_weights(Path(init_from))
        if self.shard.world > self.config.batch_size:
            raise MmcaError(f"{self.shard.world} ranks for batches of {self.config.batch_size}: some would hold "
                            "no item", "use at most --batch-size ranks")
        if not self.shard.main:
            return
        self._take_folder()
        if self.last_path.exists():  # restored above
            self._finish_interrupted_epoch()
        atomic_write_text(self.out_dir / "config.json", json.dumps(
            {**self.config.to_dict(), "feature_spec": self.spec.to_dict(), "mining": self.mining.to_dict(),
             "data": self._data_record()}, indent=2))
        if self.config.model.alpha:
            self.log(f"hardest-negative mining in {self.mining.precision} ({self.mining.reason})")

    def _take_folder(self) -> None:
        """Create or mark the run folder (new, empty or a run: checked in __init__), and sweep
        the temporary files a kill left in it."""
        folder = self.out_dir
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / MARKER).is_file():
            mark(folder, "run")
        for tmp in stale_temps(folder, RUN_FILES):
            tmp.unlink()
            self.log(f"removed {tmp.name}, left by an interrupted write")

    def _data_record(self) -> dict[str, dict]:
        return {role: ident.to_dict() for role, ident in self.data.items()}

    def _require_same_data(self, payload: dict, path: Path) -> None:
        """Refuse to go on with a train or validation split other than the run's own."""
        recorded = payload.get("data")
        if not isinstance(recorded, dict):
            self.log(f"{path} records no data identity (an older mmca wrote it): the data is not checked")
            return
        problems = []
        for role, now in self.data.items():
            saved = SplitIdentity.from_dict(recorded.get(role))
            diff = ["unreadable record"] if saved is None else saved.differences(now)
            if diff:
                problems.append(f"{role} split: " + "; ".join(diff))
        if problems:
            raise MmcaError(f"{path} was trained on other data ({path.name} first): " + " | ".join(problems),
                            "resume with the dataset and --train-split/--val-split the run started with, "
                            "or start a new --out directory")

    def _init_weights(self, path: Path) -> None:
        """Start from another run's weights (e.g. the α = 0 model), keeping this config."""
        payload = read_checkpoint(path)
        checkpoint_spec(payload, path).require_match(
            self.spec, str(path), f"the {self.train_set.split} split",
            "initialise from a run trained on the same features "
            "(same --backbone, --image-size, --grid and --text-encoder)")
        missing, unexpected = self.model.load_state_dict(payload["model"], strict=False)
        if unexpected:
            raise MmcaError(f"{path} does not fit this model: unexpected weights {unexpected[:3]}",
                            "initialise from a checkpoint trained on the same features")
        self.log(f"initialised from {path}" + (f" ({len(missing)} tensors new)" if missing else ""))

    def _restore(self, path: Path | None = None, expected: TrainConfig | None = None) -> None:
        path = path or self.last_path
        payload = read_checkpoint(path)
        spec = checkpoint_spec(payload, path)
        spec.require_match(
            self.spec, str(path), f"the {self.train_set.split} split",
            "resume with the features the run started with (same --backbone, --image-size, --grid and --text-encoder)")
        self.spec = spec.with_mirror(self.config.mirror_images)  # its provenance too: the encoder's name
        self._require_same_data(payload, path)
        saved = TrainConfig.from_dict(payload["train_config"])
        if saved != (expected or self.config):
            raise MmcaError(f"{path} was trained with another configuration ({path.name} first): "
                            + "; ".join(saved.differences(expected or self.config)),
                            "resume with the same preset and options (a preset changed by an mmca upgrade "
                            "counts too), or start a new --out directory")
        if payload.get("mining_precision") not in (None, self.mining.precision):
            self.log(f"mining in {payload['mining_precision']} as the run did so far (this device's "
                     f"auto choice would be {self.mining.precision})")
            self.mining = PrecisionChoice(payload["mining_precision"], "as the resumed run chose")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng"])
        if payload.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(payload["cuda_rng"], self.device)
        self.state = TrainState(**json.loads(payload["state"]))
        if path == self.last_path:
            self.log(f"resuming {self.out_dir} at epoch {self.state.epoch + 1}, step {self.state.step}")

    def _branch(self, path: Path) -> None:
        """Start from the α = 0 run's state at the end of the shared prefix."""
        prefix = self.config.cross_from_epoch
        if not (self.config.model.alpha and prefix):
            raise MmcaError("branching needs a staged run (alpha > 0 and cross_from_epoch > 0)")
        self._restore(path, expected=prefix_config(self.config))
        if (self.state.epoch, self.state.step) != (prefix, 0):
            raise MmcaError(f"{path} holds epoch {self.state.epoch}, step {self.state.step}, not the end of "
                            f"epoch {prefix}", "branch from the α = 0 run's state saved after that epoch")
        # best.pt holds the full model: the prefix's epochs are not candidates
        self.state.best_rsum, self.state.best_epoch, self.state.best_metrics = -1.0, 0, None
        self.log(f"epochs 1-{prefix} taken from {path} (the α = 0 run, identical up to there)")

    def _save_last(self) -> None:
        if not self.shard.main:
            return
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        save_checkpoint(self.last_path, self.model, self.spec, train_config=self.config.to_dict(),
                        mining_precision=self.mining.precision,
                        optimizer=self.optimizer.state_dict(), rng=torch.get_rng_state(), cuda_rng=cuda_rng,
                        state=json.dumps(self.state.__dict__), data=self._data_record())

    def _save_best(self) -> None:
        """best.pt: the model at the end of epoch `state.best_epoch` (the model in memory now)."""
        save_checkpoint(self.best_path, self.model, self.spec, train_config=self.config.to_dict(),
                        epoch=self.state.best_epoch, metrics=self.state.best_metrics)

    def _finish_interrupted_epoch(self) -> None:
        """Write what an epoch's end still owed when a kill came right after its last.pt: then
        the model restored is the best epoch's, and last.pt says so."""
        st = self.state
        held = read_checkpoint(self.best_path)["epoch"] if self.best_path.exists() else None
        if st.best_epoch and held != st.best_epoch:
            if (st.epoch, st.step) != (st.best_epoch, 0):
                raise MmcaError(f"{self.out_dir} holds best.pt of epoch {held}, but last.pt says epoch "
                                f"{st.best_epoch} is best (best.pt was replaced or removed)",
                                "start the run in a new --out directory")
            self._save_best()
        if st.history:
            self._write_log()

    def _train_step(self, captions: np.ndarray, kind: str) -> float:
        ds = self.train_set
        images = ds.caption_image[captions]
        views = self._image_views(len(images))
        same_image = torch.from_numpy(images[:, None] == images[None, :]).to(self.device)
        common = dict(margin=self.config.margin, same_image=same_image, kind=kind, precision=self.mining.precision,
                      fused=self.fused)
        if self.shard.world == 1:
            regions = ds.image_batch(images, views=views).to(self.device)
            tokens, mask = ds.token_features.batch(captions)
            loss = mined_loss(self.model, regions, tokens.to(self.device), mask.to(self.device), **common)
        else:  # this rank's share of the global batch; tokens padded to the batch's longest caption
            s, e = self.shard.span(len(captions))
            regions = ds.image_batch(images[s:e], views=None if views is None else views[s:e]).to(self.device)
            tokens, mask = ds.token_features.batch(captions[s:e])
            tokens, mask = pad_tokens(tokens, mask, int(ds.token_features.lengths[captions].max()))
            loss = global_mined_loss(self.model, regions, tokens.to(self.device), mask.to(self.device),
                                     self.shard, len(captions), **common)
        if not torch.isfinite(loss):
            raise MmcaError(f"training loss became {float(loss)} in epoch {self.state.epoch + 1}, "
                            f"step {self.state.step + 1}; {self.last_path} holds the last good state",
                            "lower the learning rate or set a gradient clip, then --resume")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.model.parameters(), self.shard)
        # the norm is needed anyway to clip; inf leaves the gradient as it is
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or float("inf"))
        if not torch.isfinite(norm):
            raise MmcaError(f"the gradient became {float(norm)} in epoch {self.state.epoch + 1}, step "
                            f"{self.state.step + 1} (the weights were not updated); {self.last_path} holds "
                            "the last good state", "lower the learning rate or set a gradient clip, then --resume")
        self.optimizer.step()
        return float(loss.detach())

    def _image_views(self, count: int) -> np.ndarray | None:
        """Which view of each image this step shows: drawn from (seed, epoch, step) alone, so a
        resumed run draws the same ones."""
        if not self.config.mirror_images:
            return None
        rng = np.random.default_rng([self.config.seed, self.state.epoch, self.state.step, 1])
        return rng.integers(0, 1 + len(self.train_set.image_views), size=count)

    def _train_epoch(self) -> tuple[float, str, float]:
        cfg, st = self.config, self.state
        self.model.cross_enabled = st.epoch >= cfg.cross_from_epoch
        kind = "sum" if st.epoch < cfg.warmup_epochs else "max"
        lr = learning_rate(cfg, st.epoch)
        set_learning_rate(self.optimizer, lr)
        batches = batch_order(self.train_set.num_captions, cfg.batch_size, cfg.seed, st.epoch)
        self.model.train()
        bar = tqdm(total=len(batches), initial=st.step, disable=not self.progress, leave=False,
                   desc=f"epoch {st.epoch + 1}/{cfg.epochs}", unit="batch")
        window: list[float] = []  # losses since the last checkpoint
        for captions in batches[st.step:]:
            window.append(self._train_step(captions, kind))
            st.loss_sum += window[-1]
            st.step += 1
            bar.update()
            bar.set_postfix(loss=f"{st.loss_sum / st.step:.3f}")
            if st.step % cfg.save_every_steps == 0:
                self._save_last()
                self._warn_if_at_collapse_level(window, kind)
                window = []
        bar.close()
        return st.loss_sum / max(st.step, 1), kind, lr

    def _warn_if_at_collapse_level(self, window: list[float], kind: str) -> None:
        """Mid-epoch warning: a collapsed model's validation cannot prune (every bound
        overlaps) and is slow, so say it as soon as the loss sits at 2·B·margin."""
        floor = collapse_floor(self.config)
        if kind == "max" and window and sum(window) / len(window) >= 0.98 * floor:
            self.log(f"WARNING: epoch {self.state.epoch + 1}, steps {self.state.step - len(window) + 1}-"
                     f"{self.state.step}: mean loss {sum(window) / len(window):.2f} ≈ 2·B·margin = "
                     f"{floor:.1f}, every score nearly equal: training is collapsing (or has not "
                     "started to separate pairs). " + REMEDIES)

    def _is_collapsed(self, loss: float, kind: str, metrics: dict) -> bool:
        """Every score equal: the max-violation loss sits at 2·B·margin, and since ties count
        against the true item, R@1 drops to 0 both ways (a healthy first epoch near the
        floor still ranks some true items first)."""
        r1 = metrics["i2t_r1"] + metrics["t2i_r1"]
        return kind == "max" and loss >= 0.98 * collapse_floor(self.config) and r1 < 1.0

    def run(self, until_epoch: int | None = None) -> dict:
        """Train to the last epoch, or stop once `until_epoch` epochs are done (resumable)."""
        cfg, st = self.config, self.state
        stop = cfg.epochs if until_epoch is None else min(cfg.epochs, until_epoch)
        while st.epoch < stop:
            started = time.perf_counter()
            loss, kind, lr = self._train_epoch()
            train_s = time.perf_counter() - started
            self.model.eval()
            result = evaluate(self.model, self.dev_set, mode="exact", max_rank=cfg.val_max_rank,
                              device=self.device, shard=self.shard, fused=self.fused)
            m = result.metrics
            row = {"epoch": st.epoch + 1, "loss": round(loss, 4), "loss_kind": kind, "lr": lr,
                   "train_s": round(train_s, 1), "val_s": round(result.seconds, 1),
                   **{k: round(m[k], 2) for k in LOG_FIELDS[6:13]},
                   "collapsed": self._is_collapsed(loss, kind, m), "alpha": self.model.alpha}
            if row["collapsed"]:
                self.log(f"WARNING: training collapsed in epoch {row['epoch']}: loss {loss:.2f} "
                         f"≈ 2·B·margin = {collapse_floor(cfg):.1f}, dev R@1 {m['i2t_r1']:.1f}"
                         f" / {m['t2i_r1']:.1f}. " + REMEDIES)
            st.history.append(row)
            self.log(f"epoch {row['epoch']}/{cfg.epochs} [{kind}] loss {loss:.4f} | dev "
                     f"i2t R@1 {m['i2t_r1']:.1f} t2i R@1 {m['t2i_r1']:.1f} rsum {m['rsum']:.1f} | "
                     f"train {train_s:.0f}s val {result.seconds:.0f}s")
            # best.pt holds the full model: a staged run's α = 0 epochs are not candidates
            best = m["rsum"] > st.best_rsum and (self.model.cross_enabled or not cfg.model.alpha)
            if best:
                st.best_rsum, st.best_epoch, st.best_metrics = m["rsum"], row["epoch"], dict(m)
            st.epoch, st.step, st.loss_sum = st.epoch + 1, 0, 0.0
            self._save_last()  # first: it holds all the rest, so a kill from here on loses nothing
            if best and self.shard.main:
                self._save_best()
            self._write_log()
        return {"best_rsum": st.best_rsum, "best": str(self.best_path) if self.best_path.exists() else None,
                "best_epoch": self.best_epoch(), "history": st.history}

    def best_epoch(self) -> dict | None:
        """The logged row of the epoch `best.pt` holds (the best full-model epoch), or None."""
        if not self.best_path.exists():
            return None
        epoch = read_checkpoint(self.best_path)["epoch"]
        return next((r for r in self.state.history if r["epoch"] == epoch), None)

    def _write_log(self) -> None:
        if not self.shard.main:
            return
        rows = io.StringIO()
        writer = csv.DictWriter(rows, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(self.state.history)
        atomic_write_text(self.out_dir / "log.csv", rows.getvalue())
        if not missing("plots"):  # the plot is a convenience: log.csv holds the same numbers
            plot_curves(self.state.history, self.out_dir / "curves.png")


def _warn_if_shared(train_set: RetrievalDataset, dev_set: RetrievalDataset) -> None:
    """Images in both splits make the dev recalls, and the best epoch chosen by them, measure
    memory rather than retrieval: said once, at the start."""
    shared = shared_images(train_set, dev_set)
    if shared:
        warnings.warn(f"the {train_set.split} and {dev_set.split} splits share {shared} image(s) (of "
                      f"{train_set.num_images} and {dev_set.num_images}): their dev recalls are of images "
                      f"the model trained on; remove them from one of the split lists", stacklevel=3)


def prefix_config(config: TrainConfig) -> TrainConfig:
    """The α = 0 ablation of a staged run: the same recipe with the cross module off
    throughout. Its first `config.cross_from_epoch` epochs are the staged run's, bit for bit
    (same initialisation, data order, views and optimiser state: the cross weights exist in
    both and get no gradient while off)."""
    return config.replace(model_alpha=0.0, cross_from_epoch=0)


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and dev rsum per epoch, side by side (the `plots` extra: matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_rsum) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot(epochs, [r["loss"] for r in history], marker="o")
    ax_loss.set(title="training loss", xlabel="epoch")
    ax_rsum.plot(epochs, [r["rsum"] for r in history], marker="o", color="tab:green")
    ax_rsum.set(title="dev rsum", xlabel="epoch")
    for ax in (ax_loss, ax_rsum):
        ax.grid(alpha=0.3)
        if len(epochs) < 15:
            ax.set_xticks(epochs)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(image.getvalue()))
