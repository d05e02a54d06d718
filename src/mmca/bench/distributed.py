"""`mmca bench --distributed`: data parallelism on `torch.distributed` against one process, in one run.

The same work twice, on the same inputs and the same cores: one training step of the full model
on a global batch (forward, mining, recompute, backward, gradient all-reduce, Adam) and one exact
evaluation of a gallery, first by 1 process with every thread, then by W ranks (`torchrun`, gloo
on CPU, NCCL on CUDA) sharing those threads. Each rank times the collectives it calls; the table
gives each side's seconds, the ratio, and the share of the W-rank time spent inside collectives
(waiting for a slower rank included: that is what a collective costs the job).

Under `torchrun ... -m mmca bench` the worker runs directly with the ranks torchrun gave.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from statistics import median

import numpy as np
import torch
import torch.distributed as dist

from mmca.atomic import atomic_write_text
from mmca.bench.inputs import RandomImages, RandomTokens, random_gallery, sync_device
from mmca.bench.options import DistributedOptions
from mmca.checkpoint import load_model_and_spec
from mmca.config import ModelConfig
from mmca.dist import Shard, init_from_env
from mmca.engine.global_batch import average_gradients, global_mined_loss
from mmca.engine.mining import mined_loss
from mmca.errors import MmcaError
from mmca.evaluate import Protocol, evaluate
from mmca.features.options import extraction_options
from mmca.features.prepare import open_dataset
from mmca.model import MMCA

COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather", "broadcast", "barrier")


class CollectiveClock:
    """Wall time spent inside torch.distributed's collectives while `timing()` is active (on CUDA
    each call is synchronised first and last, so the time is the collective's, not its launch's)."""

    def __init__(self, device: torch.device):
        self.seconds, self.device = 0.0, device

    @contextmanager
    def timing(self):
        originals = {name: getattr(dist, name) for name in COLLECTIVES}

        def timed(fn):
            def call(*args, **kwargs):
                sync_device(self.device)
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    sync_device(self.device)
                    self.seconds += time.perf_counter() - t
            return call

        for name, fn in originals.items():
            setattr(dist, name, timed(fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


def time_training_step(config: ModelConfig, opts: DistributedOptions, shard: Shard, device: torch.device) -> dict:
    """Seconds of one optimizer step on a global batch of `work.batch` (median of `steps` after
    a warm-up step) and the seconds inside collectives per step."""
    w = opts.work
    bsz = w.batch
    regions = RandomImages(bsz, w.regions, config.img_dim, seed=21).image_batch(np.arange(bsz))
    tokens, mask = RandomTokens(bsz, config.txt_dim, seed=22).batch(np.arange(bsz))
    s, e = shard.span(bsz)
    same_image = torch.eye(bsz, dtype=torch.bool, device=device)
    torch.manual_seed(0)
    model = MMCA(config).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    clock = CollectiveClock(device)
    times, comm = [], []
    for step in range(opts.steps + 1):
        before = clock.seconds
        sync_device(device)
        t = time.perf_counter()
        with clock.timing():
            if shard.world == 1:
                loss = mined_loss(model, regions.to(device), tokens.to(device), mask.to(device),
                                  same_image=same_image, precision="fp32")
            else:
                loss = global_mined_loss(model, regions[s:e].to(device), tokens[s:e].to(device),
                                         mask[s:e].to(device), shard, bsz, same_image=same_image,
                                         precision="fp32")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(model.parameters(), shard)
            opt.step()
        sync_device(device)
        if step:  # the first step is a warm-up
            times.append(time.perf_counter() - t)
            comm.append(clock.seconds - before)
    return {"seconds": median(times), "collective_seconds": median(comm), "loss": float(loss.detach())}


def time_evaluation(opts: DistributedOptions, shard: Shard, device: torch.device) -> dict:
    """Seconds of one exact evaluation (full protocol) of the gallery, and inside collectives."""
    w = opts.work
    if w.checkpoint and w.dataset:
        model, spec, _ = load_model_and_spec(w.checkpoint, device=device)
        features = extraction_options(spec)
        gallery = shard.main_first(lambda: open_dataset(w.dataset, w.split, features, progress=False))
        spec.require_match(gallery.spec, w.checkpoint, f"{w.dataset} {w.split}")
    else:
        torch.manual_seed(0)
        model = MMCA(w.model_config()).to(device)
        gallery = random_gallery(w.rank_images, w.img_dim, w.txt_dim, w.regions)
    model.eval()
    whole = Protocol("full", "the whole gallery", images=gallery.num_images)
    clock = CollectiveClock(device)
    t = time.perf_counter()
    with clock.timing():
        result = evaluate(model, gallery, whole, mode="exact", device=device, precision="fp32", shard=shard)
    return {"seconds": time.perf_counter() - t, "collective_seconds": clock.seconds,
            "gallery": f"{gallery.num_images} x {gallery.num_captions} ({gallery.name} {gallery.split})",
            "rsum": result.metrics["rsum"], "pair_fraction": result.pair_fraction}


def worker(opts: DistributedOptions) -> dict | None:
    """One side of the comparison (this process as one of the ranks torchrun started, or alone).
    Returns the result on rank 0 (every rank's collective seconds, the slowest rank's step)."""
    w = opts.work
    shard = init_from_env(w.device, opts.backend, opts.timeout)
    device = torch.device(shard.device_for(w.device))
    mine = {"train_step": time_training_step(w.model_config(), opts, shard, device),
            "evaluation": time_evaluation(opts, shard, device), "threads": torch.get_num_threads()}
    ranks = [mine]
    if shard.world > 1:
        ranks = [None] * shard.world
        dist.all_gather_object(ranks, mine)
    if not shard.main:
        return None
    out = {"ranks": shard.world, "threads_per_rank": mine["threads"], "device": str(device),
           "backend": dist.get_backend() if shard.world > 1 else None}
    for part in ("train_step", "evaluation"):
        out[part] = {**{k: v for k, v in ranks[0][part].items() if k != "collective_seconds"},
                     "seconds": max(r[part]["seconds"] for r in ranks),
                     "collective_seconds_per_rank": [round(r[part]["collective_seconds"], 4) for r in ranks]}
    return out


def _side(opts: DistributedOptions, ranks: int, threads: int, out_path: str) -> dict:
    """Run one side in fresh processes (its own thread count, its own process group); they read
    the options from a JSON file beside `out_path`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    options = f"{out_path}.options.json"
    atomic_write_text(Path(options), json.dumps(opts.to_dict()))
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    argv = [*launcher, "-m", "mmca", "bench", "--distributed-side", out_path, "--side-options", options]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0 and os.path.exists(out_path):
        # rank 0 writes the file only once every rank's figures are in: the failure came after
        # the measurement, when the ranks tore down their gloo connections (a rare race: one
        # rank's SIGABRT after the final barrier); the figures stand
        warnings.warn(f"the {ranks}-process side exited with status {done.returncode} after writing its "
                      "results (a rank failed while leaving the process group); the results are kept",
                      stacklevel=2)
    elif done.returncode != 0:
        raise MmcaError(f"the {ranks}-process side of the benchmark failed:\n{done.stderr[-2000:]}",
                        "run that side alone (`torchrun --nproc-per-node N -m mmca bench ...` with the same "
                        "flags, without --distributed) to see its full output")
    with open(out_path) as f:
        return json.load(f)


def compare(opts: DistributedOptions, log) -> dict:
    """1 process × T threads against W ranks × T/W threads; a table of both and the ratio."""
    w = opts.work
    world = opts.ranks
    threads = opts.threads or torch.get_num_threads()
    if world < 2 or threads % world:
        raise MmcaError(f"--ranks {world} with {threads} threads: need at least 2 ranks that share the threads "
                        "evenly", f"e.g. --ranks 2 --threads {max(2, threads - threads % 2)}")
    with tempfile.TemporaryDirectory() as tmp:
        one = _side(opts, 1, threads, os.path.join(tmp, "one.json"))
        many = _side(opts, world, threads // world, os.path.join(tmp, "many.json"))
    log(f"(dist) 1 process x {threads} threads vs {world} {many['backend']} ranks x {threads // world} "
        f"thread(s), {w.device}; global batch {w.batch}, gallery {one['evaluation']['gallery']}")
    log(f"    {'':22s}{'1 process':>12s}{f'{world} ranks':>12s}{'ratio':>8s}{'in collectives':>17s}")
    for part, label in (("train_step", "training step (s)"), ("evaluation", "exact evaluation (s)")):
        a, b = one[part]["seconds"], many[part]["seconds"]
        share = max(many[part]["collective_seconds_per_rank"]) / b
        log(f"    {label:22s}{a:12.3f}{b:12.3f}{a / b:7.2f}x{share:16.1%}")
    log("    (ratio > 1: the ranks were faster; 'in collectives': the busiest rank's share of the W-rank "
        "time inside all-reduce/all-gather/barrier, waiting for the other rank included)")
    return {"one_process": one, "ranks": many}


def run_side(opts: DistributedOptions, log, out: Path | None = None) -> dict | None:
    """This process's part in one side (under torchrun or alone); rank 0 writes the result to
    `out` (atomically: the launcher reads a file that exists as complete), or prints it."""
    result = worker(opts)
    if result is None:
        return None
    if out is not None:
        atomic_write_text(out, json.dumps(result))
    else:
        for part in ("train_step", "evaluation"):
            r = result[part]
            log(f"(dist) {result['ranks']} rank(s) x {result['threads_per_rank']} thread(s), {part}: "
                f"{r['seconds']:.3f} s, in collectives {max(r['collective_seconds_per_rank']) / r['seconds']:.1%}")
    return result
