"""One training epoch at Flickr30K scale on synthetic precomp features, single process or under
`torchrun` (data parallel): the paper's workload without the paper's data.

    python benchmarks/epoch.py --device cuda                     # 29,000 images, 145,000 captions
    torchrun --nproc-per-node 8 benchmarks/epoch.py --device cuda
    python benchmarks/epoch.py --images 64 --dev-images 16 --device cpu --txt-dim 32 --img-dim 16 ...  # smoke

The region features (N x 36 x 2048 float16, bottom-up's shape) are random, written once to a
memory-mapped file under --work; token states are random too (D_txt 768, BERT-base's width), with
the caption lengths of the real Flickr30K precomp captions (../shared/data/precomp-captions:
dev and test, tokenised with the installed text encoder's tokenizer; the train split's lengths are
drawn from those, since its caption file is not here). The features being random, the dev metrics
mean nothing: the figures are time, steps/s and peak memory. One JSON line on stdout (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from mmca.config import preset
from mmca.data.dataset import RetrievalDataset, TokenFeatures
from mmca.dist import init_from_env, shutdown
from mmca.train import Trainer

PER = 5  # captions per image


def caption_lengths(captions_dir: Path, max_tokens: int) -> np.ndarray:
    """WordPiece lengths ([CLS] and [SEP] included) of the real Flickr30K precomp captions."""
    from mmca.features import TextEncoder

    lines = []
    for name in ("dev_caps.txt", "test_caps.txt"):
        lines += (captions_dir / name).read_text(encoding="utf-8").splitlines()
    ids, _ = TextEncoder(max_tokens=max_tokens).tokenize(lines)
    return np.array([len(x) for x in ids], dtype=np.int64)


def random_memmap(path: Path, shape: tuple[int, ...], seed: int, chunk_rows: int = 512) -> np.ndarray:
    """A float16 .npy of standard-normal values, written once (reused when its shape matches)."""
    if path.is_file():
        existing = np.load(path, mmap_mode="r")
        if existing.shape == shape:
            return existing
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    g = torch.Generator().manual_seed(seed)
    for s in range(0, shape[0], chunk_rows):
        e = min(shape[0], s + chunk_rows)
        out[s:e] = torch.randn((e - s, *shape[1:]), generator=g).half().numpy()
    out.flush()
    del out
    tmp.replace(path)
    return np.load(path, mmap_mode="r")


def synthetic_split(work: Path, split: str, images: int, lengths: np.ndarray, args) -> RetrievalDataset:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    regions = random_memmap(work / f"{split}_ims.npy", (images, args.regions, args.img_dim), seed=len(split))
    states = random_memmap(work / f"{split}_tokens.npy", (int(offsets[-1]), args.txt_dim), seed=10 + len(split))
    return RetrievalDataset(name="synthetic-f30k", split=split, image_ids=[str(i) for i in range(images)],
                            captions=[""] * (images * PER), caption_image=np.repeat(np.arange(images), PER),
                            captions_per_image=PER, image_features=regions,
                            token_features=TokenFeatures(states, offsets))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="paper")
    p.add_argument("--images", type=int, default=29_000, help="training images (5 captions each)")
    p.add_argument("--dev-images", type=int, default=1_014, help="validation images (Flickr30K dev: 1,014)")
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--img-dim", type=int, default=2048)
    p.add_argument("--txt-dim", type=int, default=768)
    p.add_argument("--hidden", type=int, default=None, help="d (default: the preset's)")
    p.add_argument("--heads", type=int, default=None, help="heads (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the preset's)")
    shared = Path(os.environ.get("MMCA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--captions", type=Path, default=shared / "precomp-captions" / "f30k_precomp",
                   help="the real Flickr30K precomp caption files (for the caption lengths)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.add_argument("--work", type=Path, default=Path("runs/epoch-bench"), help="features and runs go here")
    args = p.parse_args(argv)
    if not (args.captions / "dev_caps.txt").is_file():
        p.error(f"no Flickr30K precomp captions at {args.captions}: pass --captions DIR (or set MMCA_SHARED_DATA)")

    shard = init_from_env(args.device)
    completed = False
    try:
        config = preset(args.preset).replace(epochs=1, lr_decay_epochs=())
        changes = {f"model_{k}": v for k, v in (("d", args.hidden), ("heads", args.heads)) if v is not None}
        if args.batch_size:
            changes["batch_size"] = args.batch_size
        config = config.replace(**changes)
        args.work.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)

        def build():
            real = caption_lengths(args.captions, max_tokens=64)
            dev = real[rng.integers(0, len(real), args.dev_images * PER)] if args.dev_images * PER != 5_070 \
                else real[:5_070]
            return (synthetic_split(args.work, "train", args.images, rng.choice(real, args.images * PER), args),
                    synthetic_split(args.work, "dev", args.dev_images, dev, args))

        t0 = time.perf_counter()
        train_set, dev_set = shard.main_first(build)  # rank 0 writes the files, the others map them
        data_s = time.perf_counter() - t0
        out = args.work / f"run-{shard.world}x"
        if shard.main:
            for name in ("last.pt", "best.pt"):
                (out / name).unlink(missing_ok=True)
        shard.barrier()
        device = shard.device_for(args.device)
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        trainer = Trainer(config, train_set, dev_set, out, device=device,
                          progress=shard.main and not args.no_progress, shard=shard,
                          log=print if shard.main else (lambda _: None))
        t1 = time.perf_counter()
        trainer.run()
        total = time.perf_counter() - t1
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0], device=shard.device)
        shard.max(peak)
        completed = True
        if shard.main:
            row = trainer.state.history[-1]
            steps = -(-train_set.num_captions // config.batch_size)
            print(json.dumps({
                "ranks": shard.world, "device": str(device), "preset": args.preset, "images": args.images,
                "captions": train_set.num_captions, "global_batch": config.batch_size, "steps": steps,
                "epoch_s": round(total, 2), "train_s": row.get("train_s"), "val_s": row.get("val_s"),
                "steps_per_s": round(steps / row["train_s"], 3) if row.get("train_s") else None,
                "peak_gpu_gib": round(float(peak), 2) if cuda else None, "data_s": round(data_s, 1),
                "mining": trainer.mining.precision, "dev_rsum": row["rsum"]}))
    finally:
        shutdown(completed)


if __name__ == "__main__":
    main()
