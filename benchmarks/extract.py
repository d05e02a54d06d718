"""What each extraction precision buys (docs/benchmarks.md, "Extraction precision").

For the defaults EfficientNet-Lite2 and MPNet, and the faster MobileNetV2 and MiniLM:
images/s and captions/s in each precision on 1 and 2 threads, with the ratio to fp32 in the same
run, and the features' drift from fp32 (cosine of each region and of each token state, mean and
min) over real Flickr8k dev photos and captions. bf16 is timed only where the CPU has bf16 units
(elsewhere it is emulated, many times slower); int8 quantises Linear layers, so it applies to the
text encoders only. `--structure` adds Lite2's image batch size, eager vs frozen TorchScript, and
MPNet's padded tokens per batch.

Cases take turns over the rounds and each keeps its best round, so a busy machine slows all of
them alike: compare ratios within one run, not numbers across runs.

    python benchmarks/extract.py [DATASET_DIR] [--photos 24] [--captions 200] [--drift-photos 200]
        [--drift-captions 300] [--rounds 2] [--threads 1 2] [--structure]
        [--backbones efficientnet_lite2 mobilenet_v2] [--encoders mpnet minilm]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch

from mmca.errors import MmcaError
from mmca.features import backbone as bb
from mmca.features import text_encoder as te
from mmca.features.backbone import ImageBackbone
from mmca.features.precision import vnni_int8
from mmca.features.text_encoder import TextEncoder
from mmca.hardware import cpu_model_name, native_bf16

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
BACKBONES = ("efficientnet_lite2", "mobilenet_v2")
ENCODERS = ("mpnet", "minilm")
CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS")


@dataclass
class Case:
    label: str
    unit: str
    items: int
    run: Callable[[], object]
    threads: int
    base: str | None = None  # the label of the fp32 case it is compared with
    best: float = float("inf")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def precisions(kind: str) -> list[str]:
    """The precisions worth timing here for images or text."""
    out = ["fp32"] + (["bf16"] if native_bf16("cpu")[0] else [])
    return out + ["int8"] if kind == "text" else out


def image_cases(photos: list[Path], threads: list[int], structure: bool, backbones: list[str]) -> list[Case]:
    cases = []
    for name in backbones:
        for precision in precisions("images"):
            ex = ImageBackbone(7, name, precision=precision)
            out = np.empty((len(photos), ex.regions, ex.dim), dtype=np.float16)
            for t in threads:
                label = f"{name} {precision} {t}t"
                cases.append(Case(label, "img", len(photos), lambda ex=ex, out=out: ex.extract_files(photos, out), t,
                                  f"{name} fp32 {t}t"))
    if structure and "efficientnet_lite2" in backbones:
        ex = ImageBackbone(7, "efficientnet_lite2")
        out = np.empty((len(photos), ex.regions, ex.dim), dtype=np.float16)
        for size in (1, 4, 8):
            cases.append(Case(f"efficientnet_lite2 fp32 batch {size} 1t", "img", len(photos),
                              lambda size=size: ex.extract_files(photos, out, batch_size=size), 1,
                              "efficientnet_lite2 fp32 1t"))
        eager = bb._inference_network(ex.name, None).trunk()
        x = torch.from_numpy(np.stack([ex.load_image(p) for p in photos[:8]])).permute(0, 3, 1, 2)
        cases.append(Case("efficientnet_lite2 eager trunk 1t", "img", 8,
                          lambda: [eager(ex._normalise(x[i:i + 2])) for i in range(0, 8, 2)], 1,
                          "efficientnet_lite2 frozen trunk 1t"))
        frozen = bb._feature_trunk(ex.name, None, ex.image_size)
        cases.append(Case("efficientnet_lite2 frozen trunk 1t", "img", 8,
                          lambda: [frozen(ex._normalise(x[i:i + 2])) for i in range(0, 8, 2)], 1))
    return cases


def text_cases(captions: list[str], threads: list[int], structure: bool, encoders: list[str]) -> list[Case]:
    cases = []
    for name in encoders:
        for precision in precisions("text"):
            try:
                enc = TextEncoder(name, precision=precision)
            except MmcaError as err:
                print(f"skipped {name}: {err.message}", file=sys.stderr)
                break
            ids = enc.tokenize(captions)[0]
            for t in threads:
                cases.append(Case(f"{name} {precision} {t}t", "cap", len(captions),
                                  lambda enc=enc, ids=ids: enc.encode_ids(ids), t, f"{name} fp32 {t}t"))
    if structure and any(c.label.startswith("mpnet") for c in cases):
        enc = TextEncoder("mpnet")
        ids = enc.tokenize(captions)[0]
        for tokens in (512, 1024, 4096, 8192):
            cases.append(Case(f"mpnet fp32 {tokens} tokens/batch 1t", "cap", len(captions),
                              lambda tokens=tokens: _with_tokens(tokens, lambda: enc.encode_ids(ids)), 1,
                              "mpnet fp32 1t"))
    return cases


def _with_tokens(tokens: int, run: Callable[[], object]) -> object:
    saved, te.TOKENS_PER_BATCH = te.TOKENS_PER_BATCH, tokens
    try:
        return run()
    finally:
        te.TOKENS_PER_BATCH = saved


def time_cases(cases: list[Case], rounds: int) -> None:
    for case in cases:  # warm-up: model loads, quantisation, tracing
        torch.set_num_threads(case.threads)
        case.run()
    for _ in range(rounds):
        for case in cases:
            torch.set_num_threads(case.threads)
            t0 = time.perf_counter()
            case.run()
            case.best = min(case.best, time.perf_counter() - t0)


def drift(photos: list[Path], captions: list[str], backbones: list[str],
          encoders: list[str]) -> list[dict[str, object]]:
    """Cosine to fp32 of every region (grid 7) and every token state, in each other precision."""
    torch.set_num_threads(2)
    rows = []
    for name in backbones:
        fp32 = ImageBackbone(7, name)
        ref = np.empty((len(photos), fp32.regions, fp32.dim), dtype=np.float16)
        fp32.extract_files(photos, ref)
        for precision in precisions("images")[1:]:
            other = np.empty_like(ref)
            ImageBackbone(7, name, precision=precision).extract_files(photos, other)
            c = cosines(ref, other)
            rows.append({"extractor": name, "precision": precision, "items": len(photos), "mean": float(c.mean()),
                         "min": float(c.min())})
    for name in encoders:
        try:
            ref_states = TextEncoder(name).encode(captions).states
        except MmcaError:
            continue
        for precision in precisions("text")[1:]:
            c = cosines(ref_states, TextEncoder(name, precision=precision).encode(captions).states)
            rows.append({"extractor": name, "precision": precision, "items": len(captions), "mean": float(c.mean()),
                         "min": float(c.min())})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(prog="benchmarks/extract.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path, nargs="?", default=DEFAULT_DATASET, metavar="DATASET_DIR")
    p.add_argument("--photos", type=int, default=24)
    p.add_argument("--captions", type=int, default=200)
    p.add_argument("--drift-photos", type=int, default=200)
    p.add_argument("--drift-captions", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--structure", action="store_true", help="also batch sizes, TorchScript, tokens per batch")
    p.add_argument("--no-drift", action="store_true")
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    args = p.parse_args()

    names = (args.dataset / "splits" / "dev.txt").read_text().split()
    photos = [args.dataset / "images" / n for n in names]
    lines = (args.dataset / "captions.tsv").read_text(encoding="utf-8").splitlines()
    captions = [line.partition("\t")[2] for line in lines]
    caps = " ".join(f"{k}={os.environ[k]}" for k in CAPS if os.environ.get(k)) or "no instruction-set cap"
    print(f"{date.today()}  {cpu_model_name()}  torch {torch.__version__}  capability "
          f"{torch.backends.cpu.get_cpu_capability()}  ({caps})")
    print(f"bf16 units: {native_bf16('cpu')[1]}; int8: {vnni_int8()[1]}")

    cases = image_cases(photos[: args.photos], args.threads, args.structure, args.backbones)
    cases += text_cases(captions[: args.captions], args.threads, args.structure, args.encoders)
    time_cases(cases, args.rounds)
    best = {c.label: c.best for c in cases}
    rows = []
    print(f"\n{'case':<40} {'items/s':>9}  vs fp32")
    for c in cases:
        rate = c.items / c.best
        ratio = best[c.base] / c.best if c.base in best else None
        rows.append({"case": c.label, "unit": f"{c.unit}/s", "rate": round(rate, 2),
                     "vs_fp32": None if ratio is None else round(ratio, 2)})
        print(f"{c.label:<40} {rate:>7.1f} {c.unit}/s  {'' if ratio is None else f'{ratio:.2f}x'}")
    drifts = [] if args.no_drift else drift(photos[: args.drift_photos], captions[: args.drift_captions],
                                            args.backbones, args.encoders)
    if drifts:
        print(f"\n{'drift vs fp32':<40} {'items':>6}  cos mean  cos min")
    for d in drifts:
        print(f"{d['extractor'] + ' ' + d['precision']:<40} {d['items']:>6}  {d['mean']:.4f}    {d['min']:.4f}")
    print(json.dumps({"speed": rows, "drift": drifts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
