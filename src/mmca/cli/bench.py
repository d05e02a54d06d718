"""`mmca bench`: the scoring engine against the plain per-pair path, in one run."""

from __future__ import annotations

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
Results: docs/benchmarks.md, sections "Scoring engine" and "Distributed"."""


def add_arguments(parser) -> None:
    from mmca.engine.benchmark import add_arguments as add
    add(parser)


def run(args) -> int:
    from mmca.engine.benchmark import run as bench
    return bench(args)
