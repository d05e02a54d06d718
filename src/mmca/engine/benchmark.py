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

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from mmca.config import ModelConfig
from mmca.engine.bank import bucket_length
from mmca.engine.mining import exhaustive_loss, mined_loss
from mmca.engine.pairs import pair_flops
from mmca.engine.precision import native_bf16, resolve_precision
from mmca.engine.ranking import capped_rounds, exact_blocks
from mmca.engine.scoring import ScoringEngine, inference_mode
from mmca.metrics import DIRECTIONS, RECALL_AT, retrieval_metrics
from mmca.model import MMCA

# R@1/5/10 of both directions and rsum: determined by ranks exact below 10 (`mmca.metrics`)
RECALL_KEYS = tuple(f"{d}_r{k}" for d in DIRECTIONS for k in RECALL_AT) + ("rsum",)


class RandomImages:
    """Random region features generated per index (nothing big held in memory)."""

    def __init__(self, n: int, k: int, dim: int, seed: int = 0):
        self.num_images, self.k, self.dim, self.seed = n, k, dim, seed

    def image_batch(self, index) -> torch.Tensor:
        index = np.asarray(index).reshape(-1)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index[0]))
        return torch.randn(len(index), self.k, self.dim, generator=g)


class RandomTokens:
    """Random token states with a realistic caption-length spread (mean ~16 WordPiece tokens
    including [CLS]/[SEP], 8..40), generated per batch."""

    def __init__(self, m: int, dim: int, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.lengths = np.clip(np.round(rng.gamma(9.0, 16 / 9.0, m)), 8, 40).astype(np.int64)
        self.dim, self.seed = dim, seed

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, index, dtype=torch.float32):
        index = np.asarray(index).reshape(-1)
        lengths = self.lengths[index]
        n = int(lengths.max())
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index[0]))
        tokens = torch.randn(len(index), n, self.dim, generator=g).to(dtype)
        return tokens, torch.arange(n)[None] < torch.as_tensor(lengths)[:, None]


def sync_device(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timing needs it)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


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


def bench_roof(model, args, log, rounds: int = 3) -> dict:
    """The kernel's achieved GFLOP/s against the device's matrix-product rate at the kernel's
    own shapes (the FFN rows of one block: block_pairs·(k + L) x d by d x d), same threads.

    The kernel's FLOPs are counted per real pair at its caption's bucket length (the pairs that
    pad a block's tail are the engine's overhead, not counted), and the
    two rates are measured in alternating rounds, best of each, so that a noisy machine slows
    both alike rather than one of them."""
    c = model.config
    images = RandomImages(args.score_images, args.regions, c.img_dim, seed=11)
    texts = RandomTokens(args.score_captions, c.txt_dim, seed=12)
    regions = images.image_batch(np.arange(args.score_images)).to(args.device)
    tokens, mask = (t.to(args.device) for t in texts.batch(np.arange(args.score_captions)))
    pairs = args.score_images * args.score_captions
    native, what = native_bf16(args.device)
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "device_bf16": what, "rounds": rounds}
    for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if p == "bf16" and not native:
            continue  # an emulated roof says nothing
        with inference_mode(model):
            eng = ScoringEngine(model, device=args.device, precision=p)
            ib, tb = eng.image_bank(regions), eng.text_bank((tokens, mask))
            if p == "fp32":  # the same bucket lengths and block rows in either precision
                padded = np.array([bucket_length(int(n), eng.length_granule) for n in texts.lengths])
                flops = float(np.mean([pair_flops(args.regions, int(n), c.d, c.ffn, c.cnn_filters, c.windows)
                                       for n in padded]))
                rows = eng.block_pairs * (args.regions + int(np.ceil(padded.mean())))
            # the fused kernel (compiled, or loaded from the kernel cache) beside the engine's
            fused = ScoringEngine(model, device=args.device, precision=p, fused=args.fused_kernel)
            if args.fused_kernel == "on":
                out[f"{p}_fused_first_use"] = fused_first_use(fused, ib, tb, log)
            engines = {"kernel": eng, "fused": fused} if args.fused_kernel == "on" else {"kernel": eng}
            eng.full_scores(ib, tb)
            roof, rates = 0.0, dict.fromkeys(engines, 0.0)
            for _ in range(rounds):
                roof = max(roof, gemm_rate(rows, c.d, c.d, dtype, args.device))
                for name, e in engines.items():
                    rates[name] = max(rates[name], _best_rate(lambda: e.full_scores(ib, tb), pairs, args.device,
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
    log(f"    device: {what}; auto precision -> {resolve_precision('auto', args.device).precision}")
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


def bench_scoring(model, args, log) -> dict:
    images = RandomImages(args.score_images, args.regions, model.config.img_dim, seed=11)
    texts = RandomTokens(args.score_captions, model.config.txt_dim, seed=12)
    regions = images.image_batch(np.arange(args.score_images))
    tokens, mask = texts.batch(np.arange(args.score_captions))
    on_device = [x.to(args.device) for x in (regions, tokens, mask)]
    pairs = args.score_images * args.score_captions
    out = {"pairs": pairs}
    with inference_mode(model):
        ref = plain_scores(model, *on_device).cpu()
        out["plain_pairs_per_s"] = _best_rate(lambda: plain_scores(model, *on_device), pairs, args.device)
        for precision in ("fp32", "bf16"):
            eng = ScoringEngine(model, device=args.device, precision=precision)
            ib = eng.image_bank(regions.to(eng.device))
            tb = eng.text_bank((tokens, mask))
            full = eng.full_scores(ib, tb)
            out[f"{precision}_pairs_per_s"] = _best_rate(lambda: eng.full_scores(ib, tb), pairs, args.device)
            out[f"{precision}_max_abs_diff_vs_plain"] = float((full.cpu() - ref).abs().max())
    for p in ("fp32", "bf16"):
        out[f"{p}_speedup"] = out[f"{p}_pairs_per_s"] / out["plain_pairs_per_s"]
    log(f"(a) exhaustive scoring, {args.score_images} x {args.score_captions} pairs: "
        f"plain {out['plain_pairs_per_s']:.0f} pairs/s | engine fp32 {out['fp32_pairs_per_s']:.0f} "
        f"({out['fp32_speedup']:.2f}x, max |dS| {out['fp32_max_abs_diff_vs_plain']:.1e}) | "
        f"engine bf16 {out['bf16_pairs_per_s']:.0f} ({out['bf16_speedup']:.2f}x, max |dS| "
        f"{out['bf16_max_abs_diff_vs_plain']:.1e})")
    return out


def bench_training(config, args, log) -> dict:
    bsz = args.batch
    images = RandomImages(bsz, args.regions, config.img_dim, seed=21)
    texts = RandomTokens(bsz, config.txt_dim, seed=22)
    regions = images.image_batch(np.arange(bsz)).to(args.device)
    tokens, mask = (x.to(args.device) for x in texts.batch(np.arange(bsz)))
    out = {"batch": bsz}

    def step(kind):
        torch.manual_seed(0)
        model = MMCA(config).to(args.device).train()
        opt = torch.optim.Adam(model.parameters(), lr=2e-4)
        stats = {}
        sync_device(args.device)
        t = time.perf_counter()
        if kind == "mined":
            loss = mined_loss(model, regions, tokens, mask, precision=args.mine_precision, stats=stats)
        else:
            loss = exhaustive_loss(model, regions, tokens, mask, chunk=bsz * bsz)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync_device(args.device)
        return time.perf_counter() - t, float(loss.detach()), stats

    mining = resolve_precision(args.mine_precision, args.device)
    args = type(args)(**{**vars(args), "mine_precision": mining.precision})
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


def bench_ranks(model, args, log, spec=None) -> dict:
    """`spec`: the feature spec of a trained model (its checkpoint's), adopted for --dataset."""
    eng = ScoringEngine(model, device=args.device)
    if args.dataset:
        from mmca.features.prepare import open_dataset
        from mmca.features.options import extraction_options
        ds = open_dataset(args.dataset, args.split, **(extraction_options(spec) if spec else {}))
        if spec is not None:
            spec.require_match(ds.spec, args.checkpoint, f"{args.dataset} {args.split}")
        ib, tb = eng.image_bank(ds), eng.text_bank(ds.token_features)
        caption_image = ds.caption_image
        what = f"{ds.num_images} x {ds.num_captions} ({args.dataset} {args.split})"
    else:
        n, per = args.rank_images, 5
        ib = eng.image_bank(RandomImages(n, args.regions, model.config.img_dim, seed=31))
        tb = eng.text_bank(RandomTokens(n * per, model.config.txt_dim, seed=32))
        caption_image = np.repeat(np.arange(n), per)
        what = f"{n} x {n * per} (random features)"
    total = len(ib) * len(tb)
    out = {"gallery": what, "exhaustive_pairs": total}
    cuda = torch.device(args.device).type == "cuda"
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


def _peak_rss_gib() -> float:
    """Peak resident set size of this process so far (VmHWM on Linux, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_child(args) -> dict:
    """Run in a fresh process: banks for the big gallery, then the two exact ranking passes the
    product runs, each until the time limit: mode "exact" without max_rank (image blocks) and
    with max_rank 10 (the evaluation default: sure hits, then capped walks tile by tile);
    report the peak RSS after each phase."""
    torch.manual_seed(0)
    model = MMCA(ModelConfig(dropout=0.0, d=args.d, heads=args.heads)).eval()
    eng = ScoringEngine(model, device=args.device, storage=args.big_storage)
    out = {"gallery": f"{args.big_images} x {args.big_captions}", "storage": eng.storage,
           "peak_rss_gib_start": _peak_rss_gib()}
    t0 = time.perf_counter()
    ib = eng.image_bank(RandomImages(args.big_images, args.regions, model.config.img_dim, seed=41))
    tb = eng.text_bank(RandomTokens(args.big_captions, model.config.txt_dim, seed=42))
    out.update(bank_gib=(ib.nbytes + tb.nbytes) / 2**30, bank_build_s=time.perf_counter() - t0,
               peak_rss_gib_banks=_peak_rss_gib())
    per = args.big_captions // args.big_images
    gimg = torch.as_tensor(np.arange(args.big_captions) // per, device=eng.device)
    t0 = time.perf_counter()
    done_images, t1 = 0, None
    # the exact pruned ranking pass itself (thresholds, then image blocks), stopped at the limit
    for _, _, done_images in exact_blocks(eng, ib, tb, gimg, args.big_image_block):
        if t1 is None:  # first yield: the thresholds' pair passes are done
            t1, start_passes = time.perf_counter(), eng.pair_passes
            continue
        if time.perf_counter() - t1 > args.big_seconds:
            break
    passes = eng.pair_passes - start_passes
    elapsed = time.perf_counter() - t0
    rate = passes / max(time.perf_counter() - t1, 1e-9)
    remaining = len(ib) * len(tb) * (passes / max(done_images * len(tb), 1)) - passes
    out.update(images_done=done_images, pair_passes_done=passes,
               undecided_fraction_so_far=passes / max(done_images * len(tb), 1), pairs_per_s=rate,
               estimated_full_hours=(elapsed + remaining / max(rate, 1e-9)) / 3600,
               peak_rss_gib_exact=_peak_rss_gib())
    # mode "exact", max_rank 10: pass 1 over every tile, then the first tiles' capped walks
    t0, t1, rounds = time.perf_counter(), None, 0
    for _ in capped_rounds(eng, ib, tb, gimg, 10):
        if t1 is None:  # first yield: thresholds and sure hits done
            t1, start_passes = time.perf_counter(), eng.pair_passes
            continue
        rounds += 1
        if time.perf_counter() - t1 > args.big_seconds:
            break
    out.update(capped_setup_s=t1 - t0, capped_rounds=rounds,
               capped_pair_passes=eng.pair_passes - start_passes, capped_s=time.perf_counter() - t1,
               peak_rss_gib_capped=_peak_rss_gib(), peak_rss_gib=_peak_rss_gib())
    return out


def bench_memory(args, log) -> dict:
    cmd = [sys.executable, "-c",
           "import json,sys; from mmca.engine.benchmark import main_memory; main_memory(sys.argv[1:])",
           *_memory_argv(args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if res.returncode:
        log(f"(d) memory run failed (exit status {res.returncode}):\n{res.stderr[-2000:]}")
        return {"error": res.stderr[-2000:], "returncode": res.returncode}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    log(f"(d) {out['gallery']} random gallery: banks ({out['storage']} storage) {out['bank_gib']:.2f} GiB "
        f"(built in {out['bank_build_s']:.0f} s), peak RSS {out['peak_rss_gib']:.2f} GiB "
        f"(after import {out['peak_rss_gib_start']:.2f}, banks {out['peak_rss_gib_banks']:.2f}, "
        f"exact {out['peak_rss_gib_exact']:.2f}, exact max_rank 10 {out['peak_rss_gib_capped']:.2f})")
    log(f"    exact, image blocks of {args.big_image_block}: {out['images_done']} images' blocks "
        f"({out['pair_passes_done']} pair passes, {out['pairs_per_s']:.0f} pairs/s, undecided "
        f"{out['undecided_fraction_so_far']:.1%}) in the {args.big_seconds:.0f} s limit; the whole "
        f"pass would take ~{out['estimated_full_hours']:.1f} h here")
    log(f"    exact max_rank 10: thresholds and sure-hit pass {out['capped_setup_s']:.0f} s, then "
        f"{out['capped_rounds']} scoring rounds ({out['capped_pair_passes']} pair passes) in "
        f"{out['capped_s']:.0f} s")
    return out


def _memory_argv(args) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in
            (("big_images", args.big_images), ("big_captions", args.big_captions),
             ("big_seconds", args.big_seconds), ("big_image_block", args.big_image_block),
             ("device", args.device), ("regions", args.regions), ("d", args.d), ("heads", args.heads))
            + ((("big_storage", args.big_storage),) if args.big_storage else ())]


def main_memory(argv) -> None:
    import argparse
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(argv)
    print(json.dumps(memory_child(args)))


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # --hidden first: torchrun's own parser takes `--d` for an abbreviation of its --duplicate-* options
    parser.add_argument("--hidden", "--d", dest="d", type=int, default=256, help="hidden size d")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--img-dim", type=int, default=1280)
    parser.add_argument("--txt-dim", type=int, default=384)
    parser.add_argument("--score-images", type=int, default=32)
    parser.add_argument("--score-captions", type=int, default=160)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mine-precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="precision of (b)'s mining pass (default: auto, bf16 only where native)")
    parser.add_argument("--rank-images", type=int, default=100,
                        help="random gallery of N images x 5N captions for (c)")
    parser.add_argument("--checkpoint", default=None, help="trained model for (c)")
    parser.add_argument("--dataset", default=None, help="prepared dataset root for (c)")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--big-images", type=int, default=5000)
    parser.add_argument("--big-captions", type=int, default=25000)
    parser.add_argument("--big-seconds", type=float, default=60.0)
    parser.add_argument("--big-image-block", type=int, default=4)
    parser.add_argument("--big-storage", choices=("fp32", "bf16", "fp16"), default=None,
                        help="bank storage dtype for (d) (default: fp32, exact; bf16/fp16 are an "
                             "opt-in approximation with fp32 compute)")
    parser.add_argument("--skip-big", action="store_true", help="skip (d)")
    parser.add_argument("--fused-kernel", choices=("on", "off"), default="on",
                        help="(a): also time the fused pair kernel, compiling the shapes not yet in "
                             "the kernel cache (and so warming them); off: the engine only")
    parser.add_argument("--only", default="abcd", help="subset of the parts to run, e.g. 'ac'")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    from mmca.dist import add_arguments as add_dist_arguments
    from mmca.engine.dist_benchmark import add_arguments as add_dist_benchmark_arguments
    add_dist_benchmark_arguments(parser)
    add_dist_arguments(parser)


def run(args) -> int:
    from mmca.dist import launched
    from mmca.engine import dist_benchmark

    def log(msg):
        print(msg, flush=True)

    if args.distributed_side or launched():  # one side of --distributed, or under torchrun
        result = dist_benchmark.run_side(args, log)
        _write_json(args.json, result)
        return 0
    if args.distributed:
        _write_json(args.json, dist_benchmark.compare(args, log))
        return 0

    torch.manual_seed(0)
    config = ModelConfig(img_dim=args.img_dim, txt_dim=args.txt_dim, d=args.d, heads=args.heads,
                         dropout=0.0)
    model = MMCA(config).to(args.device).eval()
    log(f"mmca bench: d {args.d}, {args.heads} heads, {args.regions} regions, D_img {args.img_dim}, "
        f"D_txt {args.txt_dim}, device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads")
    results = {}
    if "a" in args.only:
        results["scoring"] = bench_scoring(model, args, log)
        results["roof"] = bench_roof(model, args, log)
    if "b" in args.only:
        results["training"] = bench_training(ModelConfig(img_dim=args.img_dim, txt_dim=args.txt_dim,
                                                         d=args.d, heads=args.heads), args, log)
    if "c" in args.only:
        rank_model, spec = model, None
        if args.checkpoint and args.dataset:
            from mmca.checkpoint import load_model_and_spec
            rank_model, spec, _ = load_model_and_spec(args.checkpoint, device=args.device)
        elif args.checkpoint:  # random features: the spec does not matter
            from mmca.checkpoint import load_model
            rank_model, _ = load_model(args.checkpoint, device=args.device)
        results["ranks"] = bench_ranks(rank_model, args, log, spec)
    if "d" in args.only and not args.skip_big:
        results["memory"] = bench_memory(args, log)
    _write_json(args.json, results)
    return 0


def _write_json(path: str | None, results: dict | None) -> None:
    if path and results is not None:
        with open(path, "w") as f:
            json.dump(results, f, indent=2, default=str)


__all__ = ["add_arguments", "run"]
