"""`mmca bench`: the engine against the plain per-pair path, in one run on the same inputs.

(a) exhaustive scoring pairs/s: engine fp32 / bf16 vs the plain path (the model's standard
    Transformer layer `model.cross` on batches of stacked pairs built by indexing);
(b) one training step at B (forward + backward + Adam): mine-then-recompute vs all B² pairs;
(c) exact pruned vs exhaustive ranks: fraction of pair passes and equality of R@1/5/10
    (random weights by default; --checkpoint/--dataset for a trained model on real features);
(d) peak memory (RSS, separate process) ranking a big random gallery with exact pruning, with and
    without max_rank, each on a time-limited portion when the whole pass would take too long.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial

import numpy as np
import torch

from mmca.bench.inputs import RandomImages, RandomTokens, sync_device
from mmca.bench.memory import bench_memory
from mmca.bench.options import EngineOptions
from mmca.checkpoint import load_model, load_model_and_spec
from mmca.config import ModelConfig
from mmca.data.spec import FeatureSpec
from mmca.engine.bank import bucket_length
from mmca.engine.mining import exhaustive_loss, mined_loss
from mmca.engine.pairs import pair_flops
from mmca.engine.precision import native_bf16, resolve_precision
from mmca.engine.scoring import ScoringEngine, inference_mode
from mmca.features.options import FeatureOptions, extraction_options
from mmca.features.prepare import open_dataset
from mmca.metrics import DIRECTIONS, RECALL_AT, retrieval_metrics
from mmca.model import MMCA

# R@1/5/10 of both directions and rsum: determined by ranks exact below 10 (`mmca.metrics`)
RECALL_KEYS = tuple(f"{d}_r{k}" for d in DIRECTIONS for k in RECALL_AT) + ("rsum",)


def _best_rate(fn, pairs: int, device="cpu", repeat: int = 2) -> float:
    best = 0.0
    for _ in range(repeat):
        sync_device(device)
        t = time.perf_counter()
        fn()
        sync_device(device)
        best = max(best, pairs / (time.perf_counter() - t))
    return best


@torch.no_grad()
def plain_scores(model, regions, tokens, mask, batch: int = 256) -> torch.Tensor:
    """The plain path: per-item encoders once, then `model.cross` (a standard Transformer layer
    with its own Q/K/V) on every stacked pair, batch by batch, captions padded per batch."""
    r, i0 = model.encode_image(regions)
    e, c0 = model.encode_text(tokens, mask)
    n, m = len(regions), len(tokens)
    a_all = torch.arange(n).repeat_interleave(m)
    b_all = torch.arange(m).repeat(n)
    out = torch.empty(n * m, device=i0.device)
    a_all, b_all = a_all.to(i0.device), b_all.to(i0.device)
    for s in range(0, n * m, batch):
        a, b = a_all[s:s + batch], b_all[s:s + batch]
        length = int(mask[b].sum(1).max())
        i1, c1 = model.cross(r[a], e[b, :length], mask[b, :length])
        out[s:s + batch] = (i0[a] * c0[b]).sum(-1) + model.alpha * (i1 * c1).sum(-1)
    return out.view(n, m)


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, device, seconds: float = 0.3) -> float:
    """GFLOP/s of (m, k) @ (k, n) in `dtype`: the best of repeated timings over ~`seconds`."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    a @ b
    best, spent = float("inf"), 0.0
    while spent < seconds:
        sync_device(device)
        t = time.perf_counter()
        a @ b
        sync_device(device)
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return 2 * m * k * n / best / 1e9


def bench_roof(model, opts: EngineOptions, log, rounds: int = 3) -> dict:
    """The kernel's achieved GFLOP/s against the device's matrix-product rate at the kernel's
    own shapes (the FFN rows of one block: block_pairs·(k + L) x d by d x d), same threads.

    The kernel's FLOPs are counted per real pair at its caption's bucket length (the pairs that
    pad a block's tail are the engine's overhead, not counted), and the
    two rates are measured in alternating rounds, best of each, so that a noisy machine slows
    both alike rather than one of them."""
    c, w = model.config, opts.work
    images = RandomImages(opts.score_images, w.regions, c.img_dim, seed=11)
    texts = RandomTokens(opts.score_captions, c.txt_dim, seed=12)
    regions = images.image_batch(np.arange(opts.score_images)).to(w.device)
    tokens, mask = (t.to(w.device) for t in texts.batch(np.arange(opts.score_captions)))
    pairs = opts.score_images * opts.score_captions
    native, what = native_bf16(w.device)
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "device_bf16": what, "rounds": rounds}
    for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if p == "bf16" and not native:
            continue  # an emulated roof says nothing
        with inference_mode(model):
            # the eager engine, whatever the kernel cache holds (its default would fuse warm shapes)
            eng = ScoringEngine(model, device=w.device, precision=p, fused="off")
            ib, tb = eng.image_bank(regions), eng.text_bank((tokens, mask))
            if p == "fp32":  # the same bucket lengths and block rows in either precision
                padded = np.array([bucket_length(int(n), eng.length_granule) for n in texts.lengths])
                flops = float(np.mean([pair_flops(w.regions, int(n), c.d, c.ffn, c.cnn_filters, c.windows)
                                       for n in padded]))
                rows = eng.block_pairs * (w.regions + int(np.ceil(padded.mean())))
            # the fused kernel (compiled, or loaded from the kernel cache) beside the engine's
            fused = ScoringEngine(model, device=w.device, precision=p, fused=opts.fused_kernel)
            if opts.fused_kernel == "on":
                out[f"{p}_fused_first_use"] = fused_first_use(fused, ib, tb, log)
            engines = {"kernel": eng, "fused": fused} if opts.fused_kernel == "on" else {"kernel": eng}
            eng.full_scores(ib, tb)
            roof, rates = 0.0, dict.fromkeys(engines, 0.0)
            for _ in range(rounds):
                roof = max(roof, gemm_rate(rows, c.d, c.d, dtype, w.device))
                for name, e in engines.items():
                    rates[name] = max(rates[name], _best_rate(partial(e.full_scores, ib, tb), pairs, w.device,
                                                              repeat=1))
            diff = float((fused.full_scores(ib, tb) - eng.full_scores(ib, tb)).abs().max())
        out.update({f"{p}_roof_gflops": roof, f"{p}_pair_mflop": flops / 1e6, "gemm_shape": [rows, c.d, c.d],
                    f"{p}_fused_max_abs_diff": diff})
        log(f"    {p} roof {roof:.1f} GFLOP/s ({rows}x{c.d} @ {c.d}x{c.d}); "
            f"{flops / 1e6:.1f} MFLOP/pair at the bucket lengths, mean {padded.mean():.1f}; "
            f"best of {rounds} alternating rounds")
        kernel_fused, kernel = rates.get("fused", 0.0), rates["kernel"]
        for name, rate in rates.items():
            achieved = rate * flops / 1e9
            out.update({f"{p}_{name}_pairs_per_s": rate, f"{p}_{name}_gflops": achieved,
                        f"{p}_{name}_roof_fraction": achieved / roof})
            log(f"    {p} {'engine' if name == 'kernel' else 'fused '} {rate:.0f} pairs/s, {achieved:.1f} GFLOP/s "
                f"= {100 * achieved / roof:.0f}% of the roof" + (f" ({kernel_fused / kernel:.2f}x the engine, "
                                                                 f"max |dS| {diff:.1e})" if name == "fused" else ""))
    log(f"    device: {what}; auto precision -> {resolve_precision('auto', w.device).precision}")
    return out


def fused_first_use(engine: ScoringEngine, images, texts, log) -> dict:
    """Seconds of the first fused block of each caption bucket: a compile where the kernel
    cache is cold, a load from disk where it is warm (`mmca.engine.fused`)."""
    out = {}
    for bucket in texts.buckets:
        before = engine.fused.marked()
        a = torch.zeros(1, dtype=torch.int64, device=engine.device)
        t = time.perf_counter()
        engine.pair_scores(images, texts, a, bucket.captions[:1])
        out[bucket.length] = {"seconds": time.perf_counter() - t, "warm": engine.fused.marked() == before}
    cold = [v["seconds"] for v in out.values() if not v["warm"]]
    warm = [v["seconds"] for v in out.values() if v["warm"]]
    log(f"    fused {engine.precision} first use, {len(out)} caption buckets: "
        + (f"cold (compiled) {len(cold)}, {sum(cold):.1f} s in all, {max(cold):.1f} s at most" if cold else "")
        + ("; " if cold and warm else "")
        + (f"warm (from disk) {len(warm)}, {sum(warm):.1f} s in all, {max(warm):.1f} s at most" if warm else ""))
    return out


def bench_scoring(model, opts: EngineOptions, log) -> dict:
    w = opts.work
    images = RandomImages(opts.score_images, w.regions, model.config.img_dim, seed=11)
    texts = RandomTokens(opts.score_captions, model.config.txt_dim, seed=12)
    regions = images.image_batch(np.arange(opts.score_images))
    tokens, mask = texts.batch(np.arange(opts.score_captions))
    on_device = [x.to(w.device) for x in (regions, tokens, mask)]
    pairs = opts.score_images * opts.score_captions
    out = {"pairs": pairs}
    with inference_mode(model):
        ref = plain_scores(model, *on_device).cpu()
        out["plain_pairs_per_s"] = _best_rate(lambda: plain_scores(model, *on_device), pairs, w.device)
        for precision in ("fp32", "bf16"):
            eng = ScoringEngine(model, device=w.device, precision=precision, fused="off")
            ib = eng.image_bank(regions.to(eng.device))
            tb = eng.text_bank((tokens, mask))
            full = eng.full_scores(ib, tb)
            out[f"{precision}_pairs_per_s"] = _best_rate(partial(eng.full_scores, ib, tb), pairs, w.device)
            out[f"{precision}_max_abs_diff_vs_plain"] = float((full.cpu() - ref).abs().max())
    for p in ("fp32", "bf16"):
        out[f"{p}_speedup"] = out[f"{p}_pairs_per_s"] / out["plain_pairs_per_s"]
    log(f"(a) exhaustive scoring, {opts.score_images} x {opts.score_captions} pairs: "
        f"plain {out['plain_pairs_per_s']:.0f} pairs/s | engine fp32 {out['fp32_pairs_per_s']:.0f} "
        f"({out['fp32_speedup']:.2f}x, max |dS| {out['fp32_max_abs_diff_vs_plain']:.1e}) | "
        f"engine bf16 {out['bf16_pairs_per_s']:.0f} ({out['bf16_speedup']:.2f}x, max |dS| "
        f"{out['bf16_max_abs_diff_vs_plain']:.1e})")
    return out


def bench_training(config: ModelConfig, opts: EngineOptions, log) -> dict:
    w = opts.work
    bsz = w.batch
    images = RandomImages(bsz, w.regions, config.img_dim, seed=21)
    texts = RandomTokens(bsz, config.txt_dim, seed=22)
    regions = images.image_batch(np.arange(bsz)).to(w.device)
    tokens, mask = (x.to(w.device) for x in texts.batch(np.arange(bsz)))
    out = {"batch": bsz}

    def step(kind):
        torch.manual_seed(0)
        model = MMCA(config).to(w.device).train()
        opt = torch.optim.Adam(model.parameters(), lr=2e-4)
        stats = {}
        sync_device(w.device)
        t = time.perf_counter()
        if kind == "mined":
            loss = mined_loss(model, regions, tokens, mask, precision=opts.mine_precision, stats=stats)
        else:
            loss = exhaustive_loss(model, regions, tokens, mask, chunk=bsz * bsz)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync_device(w.device)
        return time.perf_counter() - t, float(loss.detach()), stats

    mining = resolve_precision(opts.mine_precision, w.device)
    opts = replace(opts, mine_precision=mining.precision)
    log(f"(b) mining in {mining.precision} ({mining.reason})")
    step("mined")  # warm-up
    t_mined, l_mined, stats = min(step("mined") for _ in range(2))
    t_full, l_full, _ = step("exhaustive")
    out.update(mined_s=t_mined, exhaustive_s=t_full, speedup=t_full / t_mined,
               mined_loss=l_mined, exhaustive_loss=l_full, **stats)
    log(f"(b) training step B={bsz} (fwd+bwd+Adam, dropout {config.dropout}): exhaustive B^2 "
        f"{t_full:.2f} s | mined {t_mined:.2f} s ({out['speedup']:.1f}x; mining pass "
        f"{stats.get('mined_pairs')} pairs, recompute {stats.get('recomputed_pairs')} pairs; "
        f"loss {l_full:.4f} vs {l_mined:.4f}, dropout noise)")
    return out


def bench_ranks(model, opts: EngineOptions, log, spec: FeatureSpec | None = None) -> dict:
    """`spec`: the feature spec of a trained model (its checkpoint's), adopted for --dataset."""
    w = opts.work
    eng = ScoringEngine(model, device=w.device)
    if w.dataset:
        ds = open_dataset(w.dataset, w.split, extraction_options(spec) if spec else FeatureOptions())
        if spec is not None:
            spec.require_match(ds.spec, w.checkpoint, f"{w.dataset} {w.split}")
        ib, tb = eng.image_bank(ds), eng.text_bank(ds.token_features)
        caption_image = ds.caption_image
        what = f"{ds.num_images} x {ds.num_captions} ({w.dataset} {w.split})"
    else:
        n, per = w.rank_images, 5
        ib = eng.image_bank(RandomImages(n, w.regions, model.config.img_dim, seed=31))
        tb = eng.text_bank(RandomTokens(n * per, model.config.txt_dim, seed=32))
        caption_image = np.repeat(np.arange(n), per)
        what = f"{n} x {n * per} (random features)"
    total = len(ib) * len(tb)
    out = {"gallery": what, "exhaustive_pairs": total}
    cuda = torch.device(w.device).type == "cuda"
    results = {}
    for name, kw in (("exhaustive", {"mode": "exhaustive"}), ("exact", {}), ("exact_max_rank_10", {"max_rank": 10}),
                     ("shortlist_100", {"mode": "shortlist", "shortlist_k": 100})):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        results[name] = eng.ranks(ib, tb, caption_image, **dict({"mode": "exact"}, **kw))
        out[f"{name}_s"] = time.perf_counter() - t
        if cuda:  # the banks are held throughout: this is what ranking the gallery needs
            out[f"{name}_peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    ex = results["exhaustive"]
    metrics = {name: retrieval_metrics(res.i2t, res.t2i, res.exact_below)
               for name, res in results.items()}
    rec_ex = {k: metrics["exhaustive"][k] for k in RECALL_KEYS}
    for name, res in results.items():
        out[f"{name}_pair_fraction"] = res.pair_passes / total
        out[f"{name}_recalls"] = {k: metrics[name][k] for k in RECALL_KEYS}
    out["exact_ranks_identical"] = bool(np.array_equal(ex.i2t, results["exact"].i2t)
                                        and np.array_equal(ex.t2i, results["exact"].t2i))
    capped = results["exact_max_rank_10"]
    out["exact_max_rank_10_identical_below_10"] = bool(
        np.array_equal(np.minimum(ex.i2t, 10), capped.i2t) and np.array_equal(np.minimum(ex.t2i, 10), capped.t2i))
    out["shortlist_100_recall_gap"] = {k: metrics["shortlist_100"][k] - v for k, v in rec_ex.items()}
    log(f"(c) ranks on {what}: exhaustive {total} pair passes, R@1/5/10 i2t "
        f"{rec_ex['i2t_r1']:.1f}/{rec_ex['i2t_r5']:.1f}/{rec_ex['i2t_r10']:.1f} t2i "
        f"{rec_ex['t2i_r1']:.1f}/{rec_ex['t2i_r5']:.1f}/{rec_ex['t2i_r10']:.1f}")
    for name in ("exact", "exact_max_rank_10", "shortlist_100"):
        r = out[f"{name}_recalls"]
        same = "identical" if all(abs(r[k] - rec_ex[k]) < 1e-9 for k in rec_ex) else "DIFFERENT"
        log(f"    {name:18s} pair passes {out[name + '_pair_fraction']:.2%} of exhaustive, "
            f"{out[name + '_s']:.1f} s, recalls {same} (rsum {r['rsum']:.2f} vs {rec_ex['rsum']:.2f})"
            + _peak(out, name))
    log(f"    exact ranks identical to exhaustive: {out['exact_ranks_identical']}; "
        f"exhaustive {out['exhaustive_s']:.1f} s" + _peak(out, "exhaustive"))
    return out


def _peak(out: dict, name: str) -> str:
    key = f"{name}_peak_gpu_gib"
    return f", peak GPU memory {out[key]:.2f} GiB" if key in out else ""


def run(opts: EngineOptions, log) -> dict:
    """The parts of `opts.parts`, on one random model (a trained one for the ranks, if given)."""
    w = opts.work
    torch.manual_seed(0)
    model = MMCA(w.model_config()).to(w.device).eval()
    log(f"mmca bench: d {w.d}, {w.heads} heads, {w.regions} regions, D_img {w.img_dim}, "
        f"D_txt {w.txt_dim}, device {w.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads")
    results = {}
    if "a" in opts.parts:
        results["scoring"] = bench_scoring(model, opts, log)
        results["roof"] = bench_roof(model, opts, log)
    if "b" in opts.parts:
        results["training"] = bench_training(ModelConfig(img_dim=w.img_dim, txt_dim=w.txt_dim, d=w.d, heads=w.heads),
                                             opts, log)
    if "c" in opts.parts:
        rank_model, spec = model, None
        if w.checkpoint and w.dataset:
            rank_model, spec, _ = load_model_and_spec(w.checkpoint, device=w.device)
        elif w.checkpoint:  # random features: the spec does not matter
            rank_model, _ = load_model(w.checkpoint, device=w.device)
        results["ranks"] = bench_ranks(rank_model, opts, log, spec)
    if "d" in opts.parts and not opts.skip_big:
        results["memory"] = bench_memory(opts.work, opts.memory, log)
    return results
