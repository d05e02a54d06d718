"""`mmca bench --search`: search latency and load over a dataset's gallery, and its growth.

1. text->image over the split's gallery (Flickr8k dev: 1,000 images): per-query latency p50/p99
   of `Searcher.search_text` (text encoder + i0·c0 + the engine's exact pruned top-k), with a
   random-weight MMCA(ModelConfig()) and with a trained checkpoint when one exists;
2. load: 8 concurrent HTTP clients against the real uvicorn server on loopback (the serve extra);
3. growth with gallery size: synthetic galleries (real features of randomly mixed images)
   of 10K and more images, memory-mapped (the index's large-gallery path).
"""

from __future__ import annotations

import glob
import http.client
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch

from mmca.bench.options import SearchOptions
from mmca.checkpoint import checkpoint_identity, load_model_and_spec, read_checkpoint, save_checkpoint
from mmca.config import ModelConfig
from mmca.data.spec import FeatureSpec
from mmca.engine import ScoringEngine
from mmca.errors import CheckpointError
from mmca.extras import require_extra
from mmca.features import ImageBackbone, TextEncoder, open_dataset
from mmca.folders import mark, require_writable
from mmca.model import MMCA
from mmca.search import Searcher, build_from_dataset
from mmca.search.index import GalleryIndex, IndexWriter

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
    """Requests/s and latency of `clients` concurrent HTTP clients against the real server."""
    require_extra("serve", "the search benchmark's load test")
    # imported here, not at the top: the server and uvicorn are the serve extra, the rest is not
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
            "feature_spec": spec.to_dict(),
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


def random_checkpoint(work: Path) -> Path:
    """A random-weight model of the default size and features, saved once under `work`."""
    path = work / "random-d256.pt"
    if not path.exists() or "feature_spec" not in read_checkpoint(path):  # absent, or from before specs
        torch.manual_seed(0)
        save_checkpoint(path, MMCA(ModelConfig()), FeatureSpec.from_extractors(ImageBackbone(), TextEncoder()))
    return path


def checkpoints(opts: SearchOptions, work: Path) -> dict[str, Path]:
    """The models to measure: random weights, and the trained model given or found under runs/."""
    found = {"random": random_checkpoint(work)}
    trained = ([str(opts.checkpoint)] if opts.checkpoint else
               sorted(glob.glob("runs/sample/mmca/best.pt")) or sorted(glob.glob("runs/*/best.pt")))
    if trained:
        found["trained"] = Path(trained[0])
    return {k: v for k, v in found.items() if k in opts.models}


def run(opts: SearchOptions, log) -> dict:
    """Latency and load on the split's gallery, then latency on each synthetic size, per model."""
    work = require_writable(opts.work, "bench", inputs=(opts.dataset,), flag="--work")
    mark(work, "bench")
    ckpts = checkpoints(opts, work)
    results = {"torch_threads": torch.get_num_threads(), "checkpoints": {k: str(v) for k, v in ckpts.items()}}
    for name, ck in ckpts.items():
        idx = work / f"{opts.split}-{name}"
        if not (idx / "index.sqlite").exists():
            build_from_dataset(idx, ck, opts.dataset, opts.split, progress=False)
        s = Searcher(idx)
        results[f"dev1k_{name}"] = latency(s, opts.queries)
        log(f"{name} {results[f'dev1k_{name}']}")
        results[f"load_{name}"] = load_test(s, 8, opts.load_seconds)
        log(f"load {name} {results[f'load_{name}']}")
    feats = np.asarray(open_dataset(opts.dataset, opts.split, progress=False).image_features)
    for n in opts.sizes:
        for name, ck in ckpts.items():
            idx = synthetic_index(work / f"syn{n}-{name}", ck, feats, n)
            s = Searcher(idx, resident=False)
            results[f"syn{n}_{name}"] = latency(s, max(20, opts.queries // 4))
            log(f"{n} {name} {results[f'syn{n}_{name}']}")
    log(json.dumps(results, indent=2))
    return results
