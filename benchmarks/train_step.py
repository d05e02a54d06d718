"""Where a training step's time goes, and the step against its plain baseline (docs/benchmarks.md).

Real Flickr8k train batches (the first --steps of the epoch after the checkpoint's), the model
in train mode (dropout on), no optimiser step, so every variant sees the same weights; each
variant draws the same dropout masks. Two measurements, in one process:

  phases   the default step timed stage by stage: data assembly from the memory-mapped cache,
           the per-item encoders, the mining banks, the no-grad mining pass, the recompute of
           the mined pairs with grad, backward; plus pair passes and recomputed pairs a step;
  a/b      the default step against the plain one (--against plain: one mining round over
           every candidate the bound admits, and the recompute as gathered pairs padded to the
           batch's longest caption) or against the default step mining in bf16 (--against
           bf16), in alternating rounds: the ratio of the best rounds is the result.

--bf16-error also measures how far the engine's bf16 scores of every pair of those batches
are from the fp32 ones (what bf16 mining's tie tolerance must cover).

With a staged run's α = 0 state (`mmca sample` leaves ALPHA0_RUN/prefix-epochN.pt), the full
model's first steps are what is measured (--alpha, the cross module as initialised);
--alpha 0 measures an α = 0 step instead.

    python benchmarks/train_step.py runs/sample/alpha0/prefix-epoch4.pt [DATASET_DIR] [--steps 12] [--rounds 5]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/train_step.py ...   # the AVX2 path
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mmca.checkpoint import load_model_and_spec
from mmca.engine import mining
from mmca.engine.precision import resolve_precision
from mmca.engine.scoring import ScoringEngine, inference_mode
from mmca.features.options import extraction_options
from mmca.features.prepare import open_dataset
from mmca.loss import max_violation_loss
from mmca.model import MMCA
from mmca.runtime import retain_freed_memory
from mmca.train import batch_order

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
STAGES = ("data", "encoders", "banks", "mining", "recompute", "backward")


def load_batches(ds, epoch: int, steps: int, seed: int, batch_size: int):
    out = []
    for captions in batch_order(ds.num_captions, batch_size, seed, epoch)[:steps]:
        images = ds.caption_image[captions]
        out.append((images, captions, torch.from_numpy(images[:, None] == images[None, :])))
    return out


def encoded(model, ds, images, captions):
    """A batch's per-item encodings with grad: (R, i0, E', c0, mask)."""
    regions = ds.image_batch(images)
    tokens, mask = ds.token_features.batch(captions)
    r, i0 = model.encode_image(regions)
    e, c0 = model.encode_text(tokens, mask)
    return r, i0, e, c0, mask


def phases(model, ds, batches, precision: str, margin: float) -> dict:
    """The default step, stage by stage (seconds summed over the batches)."""
    spent = dict.fromkeys(STAGES, 0.0)
    passes, recomputed = [], []
    for images, captions, same in batches:
        t = [time.perf_counter()]
        regions = ds.image_batch(images)
        tokens, mask = ds.token_features.batch(captions)
        t.append(time.perf_counter())
        r, i0 = model.encode_image(regions)
        e, c0 = model.encode_text(tokens, mask)
        t.append(time.perf_counter())
        if model.alpha:
            engine = ScoringEngine(model, precision=precision, check_weights=False, fixed_shape=False)
            with inference_mode(model):
                images_bank, texts_bank = mining._batch_banks(engine, r, i0, e, c0, mask)
                t.append(time.perf_counter())
                a, b, n = mining.mine_pairs(engine, images_bank, texts_bank, margin, same)
            t.append(time.perf_counter())
            s = mining._pair_scores_grad(model, r, i0, e, c0, mask, a, b)
            full = torch.full((len(images), len(images)), float("-inf")).index_put((a, b), s)
            passes.append(n)
            recomputed.append(len(a))
        else:
            t += [t[-1], t[-1]]
            full = i0 @ c0.T
        loss = max_violation_loss(full, margin, same)
        t.append(time.perf_counter())
        model.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        for stage, (t0, t1) in zip(STAGES, zip(t, t[1:])):
            spent[stage] += t1 - t0
    total = sum(spent.values())
    return {"ms_per_step": round(1e3 * total / len(batches), 1),
            "share": {k: round(v / total, 3) for k, v in spent.items()},
            "pair_passes": float(np.mean(passes)) if passes else 0.0,
            "recomputed_pairs": float(np.mean(recomputed)) if recomputed else 0.0}


@torch.no_grad()
def bf16_error(model, ds, batches) -> dict:
    """|S_bf16 - S_fp32| of the engine over every pair of each batch, at these weights: what
    bf16 mining's tie tolerance (twice `ScoringEngine.score_error`) must cover."""
    model.eval()
    errors = []
    for images, captions, _ in batches:
        r, i0, e, c0, mask = encoded(model, ds, images, captions)
        n = len(images)
        a, b = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
        scores = {}
        for precision in ("fp32", "bf16"):
            engine = ScoringEngine(model, precision=precision, check_weights=False, fixed_shape=False)
            scores[precision] = engine.pair_scores(*mining._batch_banks(engine, r, i0, e, c0, mask), a, b)
        errors.append((scores["bf16"] - scores["fp32"]).abs())
    model.train()
    err = torch.cat(errors)
    bound = ScoringEngine(model, precision="bf16", check_weights=False).score_error
    return {"pairs": len(err), "max": float(err.max()), "p99": float(err.quantile(0.99)),
            "median": float(err.median()), "engine_bound": bound}


def step_time(model, ds, batches, precision: str, margin: float, plain: bool, seed: int) -> float:
    """Seconds a step, the default or the plain one, mining in `precision` (the same dropout
    draws for every variant)."""
    recompute = mining._plain_pair_scores_grad if plain else mining._pair_scores_grad
    default_mine = mining.mine_pairs
    mining.mine_pairs = functools.partial(default_mine, rounds=1) if plain else default_mine
    torch.manual_seed(seed)
    try:
        t0 = time.perf_counter()
        for images, captions, same in batches:
            loss = mining.loss_from_encodings(model, *encoded(model, ds, images, captions), margin, same,
                                              "max", precision, recompute=recompute)
            model.zero_grad(set_to_none=True)
            loss.backward()
        return (time.perf_counter() - t0) / len(batches)
    finally:
        mining.mine_pairs = default_mine


def main() -> int:
    p = argparse.ArgumentParser(prog="benchmarks/train_step.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a training checkpoint (e.g. ALPHA0_RUN/prefix-epoch4.pt)")
    p.add_argument("dataset", type=Path, nargs="?", default=DEFAULT_DATASET, metavar="DATASET_DIR")
    p.add_argument("--cache", type=Path, help="feature cache directory (default: ~/.cache/mmca)")
    p.add_argument("--alpha", type=float, default=0.2, help="the model's α for the step (0: an α = 0 step)")
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"), help="mining precision")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=5, help="alternating a/b rounds (0: phases only)")
    p.add_argument("--against", choices=("plain", "bf16"), default="plain",
                   help="what the default step (mining in --precision) is compared with")
    p.add_argument("--bf16-error", action="store_true",
                   help="also measure how far the engine's bf16 scores are from fp32 at these weights")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    retain_freed_memory()

    base, spec, payload = load_model_and_spec(args.checkpoint)
    model = MMCA(replace(base.config, alpha=args.alpha))
    model.load_state_dict(base.state_dict())
    model.train()
    config = payload["train_config"]
    epoch = json.loads(payload["state"])["epoch"] if "state" in payload else 0  # the epoch in progress
    ds = open_dataset(args.dataset, "train", extraction_options(spec), cache_dir=args.cache, progress=False)
    spec.require_match(ds.spec, args.checkpoint, f"{args.dataset} train")
    batches = load_batches(ds, epoch, args.steps, config["seed"], config["batch_size"])
    precision = resolve_precision(args.precision).precision
    margin = config["margin"]
    for images, captions, same in batches[:2]:  # warm-up: allocation, kernel selection
        mining.loss_from_encodings(model, *encoded(model, ds, images, captions), margin, same,
                                   "max", precision).backward()
    result = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
              "alpha": args.alpha, "precision": precision, "epoch": epoch + 1, "steps": len(batches),
              "phases": phases(model, ds, batches, precision, margin)}
    ph = result["phases"]
    print(f"step at epoch {epoch + 1}, α {args.alpha}, mining {precision}, {torch.get_num_threads()} threads, "
          f"capability {result['cpu_capability']}: {ph['ms_per_step']} ms/step; pair passes "
          f"{ph['pair_passes']:.0f}, recomputed {ph['recomputed_pairs']:.0f} a step")
    print("  " + "  ".join(f"{k} {100 * v:.0f} %" for k, v in ph["share"].items()))
    if args.bf16_error and args.alpha:
        err = result["bf16_error"] = bf16_error(model, ds, batches)
        print(f"  bf16 scores against fp32 over {err['pairs']:,} pairs: max {err['max']:.1e}, p99 {err['p99']:.1e}, "
              f"median {err['median']:.1e} (the engine's bound: {err['engine_bound']:.1e})")
    if args.rounds and args.alpha:
        other = ("plain", precision, True) if args.against == "plain" else ("bf16 mining", "bf16", False)
        times = {other[0]: [], "default": []}
        for rnd in range(args.rounds):
            times[other[0]].append(step_time(model, ds, batches, other[1], margin, other[2], rnd))
            times["default"].append(step_time(model, ds, batches, precision, margin, False, rnd))
        base_t, ours = times[other[0]], times["default"]
        ratios = [a / b for a, b in zip(base_t, ours)]
        result["ab"] = {"against": other[0], "against_ms": [round(1e3 * t, 1) for t in base_t],
                        "default_ms": [round(1e3 * t, 1) for t in ours],
                        "ratio_best": round(min(base_t) / min(ours), 3),
                        "ratio_rounds": [round(x, 3) for x in ratios]}
        print(f"  {other[0]} step time / default step time ({precision}): {result['ab']['ratio_best']:.2f} "
              f"(> 1: the default is faster; best rounds {1e3 * min(base_t):.0f} vs {1e3 * min(ours):.0f} ms; "
              "per round " + ", ".join(f"{x:.2f}" for x in ratios) + ")")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
