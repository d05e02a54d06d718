"""What each registered feature extractor costs (docs/results.md, "Backbones and text encoders").

Images per second of every image backbone (at the input sizes given) and captions per second of
every text encoder, on real Flickr8k dev photos and captions, one thread each (`mmca prepare`
runs one worker per core), with the ratio to the default. The extractors take turns over
several rounds and each keeps its best round, so a busy machine slows all of them alike.

    python benchmarks/extractors.py [DATASET_DIR] [--photos 32] [--captions 400] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mmca.errors import MmcaError
from mmca.features.backbone import BACKBONES, DEFAULT_BACKBONE, ImageBackbone
from mmca.features.text_encoder import DEFAULT_TEXT_ENCODER, TEXT_ENCODERS, TextEncoder

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def main() -> int:
    p = argparse.ArgumentParser(prog="benchmarks/extractors.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path, nargs="?", default=DEFAULT_DATASET, metavar="DATASET_DIR")
    p.add_argument("--photos", type=int, default=32)
    p.add_argument("--captions", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="+", default=[260, 352], help="input sides to time")
    args = p.parse_args()
    torch.set_num_threads(1)

    names = (args.dataset / "splits" / "dev.txt").read_text().split()[: args.photos]
    photos = [args.dataset / "images" / n for n in names]
    lines = (args.dataset / "captions.tsv").read_text(encoding="utf-8").splitlines()[: args.captions]
    captions = [line.partition("\t")[2] for line in lines]

    jobs = {}
    for name in BACKBONES:
        for size in args.sizes:
            bb = ImageBackbone(6, name, size)
            out = np.empty((len(photos), bb.regions, bb.dim), dtype=np.float16)
            jobs[f"{name} {size} px"] = ("img", len(photos), lambda bb=bb, out=out: bb.extract_files(photos, out))
    for name in TEXT_ENCODERS:
        try:
            enc = TextEncoder(name)
        except MmcaError as err:
            print(f"skipped text encoder {name}: {err.message}", file=sys.stderr)
            continue
        ids = enc.tokenize(captions)[0]
        jobs[f"{name} ({enc.dim}-d)"] = ("cap", len(captions), lambda enc=enc, ids=ids: enc.encode_ids(ids))
    for _, _, run in jobs.values():
        run()  # warm-up: model load, tracing, allocation
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(args.rounds):
        for key, (_, _, run) in jobs.items():
            t0 = time.perf_counter()
            run()
            best[key] = min(best[key], time.perf_counter() - t0)

    base_img = f"{DEFAULT_BACKBONE} {BACKBONES[DEFAULT_BACKBONE].image_size} px"
    base_cap = next(k for k in jobs if k.startswith(DEFAULT_TEXT_ENCODER + " "))
    rows = []
    print(f"{'extractor':<28} {'items/s':>9}  vs default   (one thread; torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()})")
    for key, (unit, n, _) in jobs.items():
        rate = n / best[key]
        base = best[base_img if unit == "img" else base_cap]
        rows.append({"extractor": key, "unit": f"{unit}/s", "rate": round(rate, 1),
                     "relative": round(base / best[key], 2)})
        print(f"{key:<28} {rate:>7.1f} {unit}/s  {base / best[key]:.2f}x")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
