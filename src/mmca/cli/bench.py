"""`mmca bench`: the scoring engine against the plain per-pair path, data parallelism against one
process, and search latency; the flags fill the typed options of `mmca.bench.options`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mmca.atomic import atomic_write_text
from mmca.bench import distributed, engine, search
from mmca.bench.options import DistributedOptions, EngineOptions, MemoryOptions, SearchOptions, Workload
from mmca.dist import add_arguments as add_dist_arguments
from mmca.dist import launched
from mmca.errors import MmcaError

NAME = "bench"
HELP = "benchmark the scoring engine against the plain per-pair path (--distributed: ranks vs one process)"
DESCRIPTION = """\
Measures, in one run on the same random inputs (d 256, 16 heads, 36 regions, ~16 tokens):
  (a) exhaustive scoring pairs/s, engine fp32 and bf16 vs the plain per-pair path;
  (b) one training step at B=64: mine-then-recompute vs back-propagating all B^2 pairs;
  (c) exact pruned vs exhaustive ranks: pair-pass fraction, identical R@1/5/10
      (--checkpoint and --dataset run it on a trained model and real features);
  (d) peak memory on a 5,000 x 25,000 random gallery (time-limited portion; --skip-big).
--distributed instead compares data parallelism on torch.distributed with one process: one
training step at --batch and one exact evaluation, 1 process x T threads against --ranks
ranks x T/ranks threads, with the share of time inside collectives. Under
`torchrun --nproc-per-node N -m mmca bench` the same measurement runs on the ranks given.
--search --dataset ROOT measures text->image search over the split's gallery: latency p50/p99,
load from 8 HTTP clients (needs the serve extra), and growth on synthetic galleries (--sizes).
Results: docs/benchmarks.md, sections "Scoring engine", "Search" and "Distributed"."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--checkpoint", default=None, help="trained model for (c), --distributed and --search")
    parser.add_argument("--dataset", "--data", dest="dataset", default=None,
                        help="prepared dataset root for (c) and --distributed; the gallery of --search")
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
    parser.add_argument("--json", "--out", dest="json", default=None, help="also write the results to this file")
    _add_distributed_arguments(parser)
    _add_search_arguments(parser)
    add_dist_arguments(parser)


def _add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--distributed", action="store_true",
                        help="data parallelism: one training step and one exact evaluation, 1 process x T "
                             "threads against --ranks ranks x T/ranks threads (torch.distributed)")
    parser.add_argument("--ranks", type=int, default=2, help="with --distributed: ranks of the W-rank side (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="with --distributed: threads shared by each side (default: this process's)")
    parser.add_argument("--steps", type=int, default=3,
                        help="with --distributed: timed training steps after one warm-up (median)")
    # one side of --distributed, started by the comparison: where to write, and its options as JSON
    parser.add_argument("--distributed-side", default=None, metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--side-options", default=None, metavar="FILE", help=argparse.SUPPRESS)


def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--search", action="store_true",
                        help="search latency, load and growth over the gallery of --dataset (--split)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-search"),
                        help="with --search: indexes and checkpoints it builds, reused by later runs")
    parser.add_argument("--queries", type=int, default=200, help="with --search: timed queries per gallery")
    parser.add_argument("--load-seconds", type=float, default=30.0, help="with --search: length of the load test")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000],
                        help="with --search: synthetic gallery sizes (none: skip)")
    parser.add_argument("--models", nargs="+", choices=("random", "trained"), default=["random", "trained"],
                        help="with --search: models to measure (random weights prune nothing: slow on big galleries)")


def workload(args: argparse.Namespace) -> Workload:
    return Workload(device=args.device, d=args.d, heads=args.heads, regions=args.regions, img_dim=args.img_dim,
                    txt_dim=args.txt_dim, batch=args.batch, rank_images=args.rank_images,
                    checkpoint=args.checkpoint, dataset=args.dataset, split=args.split)


def engine_options(args: argparse.Namespace) -> EngineOptions:
    memory = MemoryOptions(images=args.big_images, captions=args.big_captions, seconds=args.big_seconds,
                           image_block=args.big_image_block, storage=args.big_storage)
    return EngineOptions(work=workload(args), score_images=args.score_images, score_captions=args.score_captions,
                         mine_precision=args.mine_precision, memory=memory, parts=args.only, skip_big=args.skip_big,
                         fused_kernel=args.fused_kernel)


def distributed_options(args: argparse.Namespace) -> DistributedOptions:
    """The options of the command line, or those the comparison handed to this side."""
    if args.side_options:
        return DistributedOptions.from_dict(json.loads(Path(args.side_options).read_text(encoding="utf-8")))
    return DistributedOptions(work=workload(args), ranks=args.ranks, threads=args.threads, steps=args.steps,
                              backend=args.dist_backend, timeout=args.dist_timeout)


def search_options(args: argparse.Namespace) -> SearchOptions:
    if args.dataset is None:
        raise MmcaError("--search needs the gallery to search: --dataset ROOT",
                        "e.g. mmca bench --search --dataset data/flickr8k --split dev")
    return SearchOptions(dataset=Path(args.dataset), split=args.split, work=args.work, queries=args.queries,
                         load_seconds=args.load_seconds, sizes=tuple(args.sizes), models=tuple(args.models),
                         checkpoint=Path(args.checkpoint) if args.checkpoint else None)


def log(message: str) -> None:
    print(message, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.distributed_side or launched():  # one side of --distributed, or under torchrun
        out = Path(args.distributed_side) if args.distributed_side else None
        _write_json(args.json, distributed.run_side(distributed_options(args), log, out))
    elif args.distributed:
        _write_json(args.json, distributed.compare(distributed_options(args), log))
    elif args.search:
        opts = search_options(args)
        _write_json(args.json or opts.work / "results.json", search.run(opts, log))
    else:
        _write_json(args.json, engine.run(engine_options(args), log))
    return 0


def _write_json(path: str | Path | None, results: dict | None) -> None:
    if path and results is not None:
        atomic_write_text(path, json.dumps(results, indent=2, default=str))
