"""`mmca bench` part (d): peak memory (RSS, in a fresh process) ranking a big random gallery
with exact pruning, with and without max_rank, each pass on a time-limited portion when the
whole of it would take too long."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from mmca.bench.inputs import RandomImages, RandomTokens
from mmca.bench.options import MemoryOptions, Workload
from mmca.config import ModelConfig
from mmca.engine.ranking import capped_rounds, exact_blocks
from mmca.engine.scoring import ScoringEngine
from mmca.model import MMCA


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


def memory_child(w: Workload, m: MemoryOptions) -> dict:
    """Run in a fresh process: banks for the big gallery, then the two exact ranking passes the
    product runs, each until the time limit: mode "exact" without max_rank (image blocks) and
    with max_rank 10 (the evaluation default: sure hits, then capped walks tile by tile);
    report the peak RSS after each phase."""
    torch.manual_seed(0)
    model = MMCA(ModelConfig(dropout=0.0, d=w.d, heads=w.heads)).eval()
    eng = ScoringEngine(model, device=w.device, storage=m.storage)
    out = {"gallery": f"{m.images} x {m.captions}", "storage": eng.storage,
           "peak_rss_gib_start": _peak_rss_gib()}
    t0 = time.perf_counter()
    ib = eng.image_bank(RandomImages(m.images, w.regions, model.config.img_dim, seed=41))
    tb = eng.text_bank(RandomTokens(m.captions, model.config.txt_dim, seed=42))
    out.update(bank_gib=(ib.nbytes + tb.nbytes) / 2**30, bank_build_s=time.perf_counter() - t0,
               peak_rss_gib_banks=_peak_rss_gib())
    per = m.captions // m.images
    gimg = torch.as_tensor(np.arange(m.captions) // per, device=eng.device)
    t0 = time.perf_counter()
    done_images, t1 = 0, None
    # the exact pruned ranking pass itself (thresholds, then image blocks), stopped at the limit
    for _, _, done in exact_blocks(eng, ib, tb, gimg, m.image_block):
        done_images = done
        if t1 is None:  # first yield: the thresholds' pair passes are done
            t1, start_passes = time.perf_counter(), eng.pair_passes
            continue
        if time.perf_counter() - t1 > m.seconds:
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
        if time.perf_counter() - t1 > m.seconds:
            break
    out.update(capped_setup_s=t1 - t0, capped_rounds=rounds,
               capped_pair_passes=eng.pair_passes - start_passes, capped_s=time.perf_counter() - t1,
               peak_rss_gib_capped=_peak_rss_gib(), peak_rss_gib=_peak_rss_gib())
    return out


def bench_memory(w: Workload, m: MemoryOptions, log) -> dict:
    """`memory_child` in a fresh process (its peak RSS is the gallery's alone), options as JSON on stdin."""
    request = json.dumps({"work": asdict(w), "memory": asdict(m)})
    res = subprocess.run([sys.executable, "-m", "mmca.bench.memory"], input=request, capture_output=True, text=True,
                         env=dict(os.environ))
    if res.returncode:
        log(f"(d) memory run failed (exit status {res.returncode}):\n{res.stderr[-2000:]}")
        return {"error": res.stderr[-2000:], "returncode": res.returncode}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    log(f"(d) {out['gallery']} random gallery: banks ({out['storage']} storage) {out['bank_gib']:.2f} GiB "
        f"(built in {out['bank_build_s']:.0f} s), peak RSS {out['peak_rss_gib']:.2f} GiB "
        f"(after import {out['peak_rss_gib_start']:.2f}, banks {out['peak_rss_gib_banks']:.2f}, "
        f"exact {out['peak_rss_gib_exact']:.2f}, exact max_rank 10 {out['peak_rss_gib_capped']:.2f})")
    log(f"    exact, image blocks of {m.image_block}: {out['images_done']} images' blocks "
        f"({out['pair_passes_done']} pair passes, {out['pairs_per_s']:.0f} pairs/s, undecided "
        f"{out['undecided_fraction_so_far']:.1%}) in the {m.seconds:.0f} s limit; the whole "
        f"pass would take ~{out['estimated_full_hours']:.1f} h here")
    log(f"    exact max_rank 10: thresholds and sure-hit pass {out['capped_setup_s']:.0f} s, then "
        f"{out['capped_rounds']} scoring rounds ({out['capped_pair_passes']} pair passes) in "
        f"{out['capped_s']:.0f} s")
    return out


def main() -> None:
    """The child's side: options from stdin, the figures as one JSON line on stdout."""
    raw = json.load(sys.stdin)
    print(json.dumps(memory_child(Workload(**raw["work"]), MemoryOptions(**raw["memory"]))))


if __name__ == "__main__":
    main()
