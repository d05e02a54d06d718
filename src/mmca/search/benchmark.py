"""Search latency and load: `python benchmarks/search.py` (or `python -m mmca.search.benchmark`).

1. text->image over the Flickr8k dev gallery (1,000 images): per-query latency p50/p99 of
   `Searcher.search_text` (text encoder + i0·c0 + the engine's exact pruned top-k), with a
   random-weight MMCA(ModelConfig()) and with a trained checkpoint when one exists;
2. load: 8 concurrent HTTP clients for 30 s against the real uvicorn server on loopback;
3. growth with gallery size: synthetic galleries (real dev features of randomly mixed images)
   of 10K and more images, memory-mapped (the index's large-gallery path).
"""

from __future__ import annotations

import argparse
import glob
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch

QUERIES = [
    "a dog runs on the beach", "two children play in a fountain", "a man rides a bike down a hill",
    "a girl in a pink dress climbs stairs", "a black dog jumps over a log", "people walk down a busy street",
    "a surfer rides a wave", "a brown dog carries a stick in the water", "a boy kicks a soccer ball",
    "a woman sits on a bench in the park", "a climber on a rock face", "two dogs play in the snow",
]


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def latency(searcher, n: int, k: int = 10) -> dict:
    for q in QUERIES[:3]:
        searcher.search_text(q, k)  # warm-up
    ms, passes, enc = [], [], []
    for i in range(n):
        _, st = searcher.search_text(QUERIES[i % len(QUERIES)] + ("" if i < len(QUERIES) else f" {i}"), k)
        ms.append(st.ms)
        passes.append(st.pair_passes)
        enc.append(st.extra.get("encode_ms", 0.0))
    return {"queries": n, "p50_ms": round(pct(ms, 50), 1), "p99_ms": round(pct(ms, 99), 1),
            "mean_ms": round(float(np.mean(ms)), 1), "encode_p50_ms": round(pct(enc, 50), 1),
            "pair_passes_mean": round(float(np.mean(passes)), 1), "gallery": searcher.index.num_images,
            "resident": searcher.resident}


def load_test(searcher, clients: int = 8, seconds: float = 30.0) -> dict:
    import http.client

    import uvicorn

    from mmca.search.server import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(searcher), log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    lat, errors, lock = [], [], threading.Lock()
    stop = time.perf_counter() + seconds

    def client(cid):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = 0
        while time.perf_counter() < stop:
            body = json.dumps({"query": f"{QUERIES[(cid + i) % len(QUERIES)]} {cid}-{i}", "k": 10})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/api/search", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except Exception as err:  # noqa: BLE001
                ok = False
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                r = err
            dt = (time.perf_counter() - t0) * 1e3
            with lock:
                (lat if ok else errors).append(dt if ok else str(getattr(r, "status", r)))
            i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server.should_exit = True
    th.join(10)
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(lat) + len(errors),
            "errors": len(errors), "throughput_qps": round(len(lat) / wall, 2),
            "p50_ms": round(pct(lat, 50), 1), "p99_ms": round(pct(lat, 99), 1)}


def synthetic_index(out: Path, ckpt: Path, features: np.ndarray, n: int, seed: int = 0) -> Path:
    """n synthetic images: each the region-wise mean of two random real images plus noise."""
    from mmca.checkpoint import load_model_and_spec
    from mmca.engine import ScoringEngine
    from mmca.errors import CheckpointError
    from mmca.search.index import GalleryIndex, IndexWriter, checkpoint_identity

    if (out / "index.sqlite").exists() and GalleryIndex(out).num_images == n:
        return out
    model, spec, _ = load_model_and_spec(ckpt)
    if spec.image.regions != features.shape[1] or spec.image.dim != features.shape[2]:
        raise CheckpointError(f"{ckpt} was trained on {spec.image.regions} x {spec.image.dim} regions; the "
                              f"synthetic gallery's source features are {features.shape[1]} x {features.shape[2]}",
                              "pass features prepared as the checkpoint's (same --backbone, --grid)")
    engine = ScoringEngine(model, "cpu")
    rng = np.random.default_rng(seed)
    meta = {"checkpoint": checkpoint_identity(ckpt), "model_config": model.config.to_dict(),
            "backbone": None, "text_encoder": _encoder_identity(), "text_encoder_dir": None,
            "storage": "fp16", "source": {"kind": "synthetic", "n": n}, "created": time.time()}
    with IndexWriter(out, meta, overwrite=True) as w:
        for s in range(0, n, 5000):
            b = min(5000, n - s)
            a, c = rng.integers(0, len(features), b), rng.integers(0, len(features), b)
            x = 0.5 * (features[a].astype(np.float32) + features[c].astype(np.float32))
            x += rng.normal(0, 0.05, x.shape).astype(np.float32)
            bank = engine.image_bank(torch.from_numpy(x))
            w.add_images(bank, [f"syn-{s + i}" for i in range(b)], [None] * b)
    return out


def _encoder_identity():
    from mmca.features import TextEncoder
    from mmca.search.index import text_encoder_identity
    return text_encoder_identity(TextEncoder().describe())


def main(argv=None) -> int:
    from mmca.checkpoint import read_checkpoint, save_checkpoint
    from mmca.config import ModelConfig
    from mmca.features import open_dataset
    from mmca.model import MMCA
    from mmca.search import Searcher, build_from_dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/shared/data/flickr8k")
    p.add_argument("--work", type=Path, default=Path("runs/bench-search"))
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--load-seconds", type=float, default=30.0)
    p.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    p.add_argument("--out", type=Path, default=Path("runs/bench-search/results.json"))
    p.add_argument("--models", nargs="+", choices=("random", "trained"), default=["random", "trained"],
                   help="which models to measure (random weights prune nothing: slow on big galleries)")
    p.add_argument("--checkpoint", type=Path,
                   help="the trained model (default: runs/sample/mmca/best.pt, else the first runs/*/best.pt)")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rand = args.work / "random-d256.pt"
    if not rand.exists() or "feature_spec" not in read_checkpoint(rand):  # absent, or from before specs
        from mmca.features import ImageBackbone, TextEncoder
        from mmca.data.spec import FeatureSpec
        save_checkpoint(rand, MMCA(ModelConfig()), FeatureSpec.from_extractors(ImageBackbone(), TextEncoder()))
    ckpts = {"random": rand}
    trained = ([str(args.checkpoint)] if args.checkpoint else
               sorted(glob.glob("runs/sample/mmca/best.pt")) or sorted(glob.glob("runs/*/best.pt")))
    if trained:
        ckpts["trained"] = Path(trained[0])
    ckpts = {k: v for k, v in ckpts.items() if k in args.models}
    results = {"torch_threads": torch.get_num_threads(), "checkpoints": {k: str(v) for k, v in ckpts.items()}}
    for name, ck in ckpts.items():
        idx = args.work / f"dev-{name}"
        if not (idx / "index.sqlite").exists():
            build_from_dataset(idx, ck, args.data, "dev", progress=False)
        s = Searcher(idx)
        results[f"dev1k_{name}"] = latency(s, args.queries)
        print(name, results[f"dev1k_{name}"], flush=True)
        if name == "random" or name == "trained":
            results[f"load_{name}"] = load_test(s, 8, args.load_seconds)
            print("load", name, results[f"load_{name}"], flush=True)
    feats = np.asarray(open_dataset(args.data, "dev", progress=False).image_features)
    for n in args.sizes:
        for name, ck in ckpts.items():
            idx = synthetic_index(args.work / f"syn{n}-{name}", ck, feats, n)
            s = Searcher(idx, resident=False)
            results[f"syn{n}_{name}"] = latency(s, max(20, args.queries // 4))
            print(n, name, results[f"syn{n}_{name}"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
