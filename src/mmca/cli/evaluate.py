"""`mmca evaluate`: the field's image-sentence retrieval protocol on one split."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmca.cli.features import add_feature_arguments, feature_options, non_negative_int, positive_int
from mmca.dist import add_arguments as add_dist_arguments
from mmca.engine.precision import CHOICES
from mmca.evaluate import DEFAULT_MAX_RANK, MODES, PROTOCOLS
from mmca.metrics import TIES

NAME = "evaluate"
HELP = "evaluate a checkpoint with the standard protocol (R@1/5/10 both ways, rsum, ranks)"
DESCRIPTION = """\
Evaluate a checkpoint on one split of DATASET_DIR (either layout; features are prepared and
cached on first use, like `mmca prepare`), with the field's standard protocol (VSE++, SCAN):

  image->text  each image is ranked against every caption of the fold; its rank is that of the
               best-ranked of its own captions (best of 5)
  text->image  each caption is ranked against every image of the fold; its rank is that of its
               one image
  R@K          percentage of queries whose true item ranks in the top K (K = 1, 5, 10); a tie
               counts against the true item (--ties pessimistic), so a collapsed model scores
               0, not 100; --ties argsort breaks ties as the field's code does
  rsum         the sum of the six R@K;  medr / meanr: floor(median) + 1 / mean rank + 1

The features are those the checkpoint was trained with (its feature spec: backbone, input
size, grid, text encoder, token limit); a cache or flag that contradicts them is refused.

protocols (--protocol):
""" + "\n".join(f"  {p.name:7s} {p.description}" for p in PROTOCOLS.values()) + f"""

modes (--mode):
  exact       the cheap global score i0·c0 bounds every pair (|α·i1·c1| <= α), so the cross unit
              runs only on pairs that can still change a rank: the same ranks as exhaustive,
              bit for bit, for a fraction of the cost (default)
  exhaustive  the cross unit on every (image, caption) pair of each fold
  shortlist   the cross unit on the top --shortlist-k images/captions of i0·c0 only: approximate,
              compare with exact before trusting it

Ranks are exact below {DEFAULT_MAX_RANK} by default, which settles R@1/5/10 and any median rank
below {DEFAULT_MAX_RANK}; --full-ranks computes every rank exactly (needed for the mean rank; slower).

The results (metrics, per-fold metrics, pair passes run and their fraction of exhaustive,
timing, checkpoint, dataset) go to a JSON file; a table is printed at the end.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", type=Path, metavar="DATASET_DIR")
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by `mmca train`")
    p.add_argument("--split", default="dev", help="split to evaluate (default: dev)")
    p.add_argument("--protocol", default="full", choices=list(PROTOCOLS), help="default: full")
    p.add_argument("--mode", default="exact", choices=MODES, help="default: exact")
    p.add_argument("--shortlist-k", type=positive_int, default=100, metavar="K",
                   help="candidates re-ranked per query in shortlist mode (default: 100)")
    p.add_argument("--full-ranks", action="store_true",
                   help=f"every rank exact, not only those below {DEFAULT_MAX_RANK} (gives the mean rank)")
    p.add_argument("--ties", default="pessimistic", choices=TIES,
                   help="a candidate scoring exactly as the true item: counts against it (pessimistic, "
                        "default) or by the field's argsort order (higher index first)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--precision", default="auto", choices=CHOICES,
                   help="pair kernel precision: auto (default) is fp32 in the exact modes and bf16 in "
                        "shortlist mode where the device has bf16 units; bf16 in an exact mode is "
                        "an approximation (ranks may differ)")
    p.add_argument("--cache", type=Path, help="feature cache directory (default: ~/.cache/mmca)")
    p.add_argument("--captions-per-image", type=non_negative_int, default=5, metavar="N",
                   help="default: 5; 0 accepts any count that is the same for every image")
    add_feature_arguments(p, adopts=True)
    add_dist_arguments(p)
    p.add_argument("--out", type=Path, metavar="JSON",
                   help="results file, new or an earlier result to replace (default: inside a model "
                        "directory, or beside a checkpoint file: eval-<split>-<protocol>-<mode>-<precision>[...].json)")


def run(args: argparse.Namespace) -> int:
    import torch

    from mmca.checkpoint import load_model_and_spec
    from mmca.data.layouts import read_split
    from mmca.dist import init_from_env
    from mmca.evaluate import (
        check_protocol,
        default_results_path,
        evaluate,
        format_table,
        require_results_file,
        write_results,
    )
    from mmca.features.prepare import open_dataset
    from mmca.hardware import usable_device

    if args.out is not None:
        require_results_file(args.out)  # before the checkpoint is read or any feature computed
    model, spec, _ = load_model_and_spec(args.checkpoint)  # fails fast on a bad checkpoint
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    usable_device(device)  # a clear error before any feature is computed
    shard = init_from_env(device, args.dist_backend, args.dist_timeout)  # one shard without torchrun
    device = shard.device_for(device)
    protocol = PROTOCOLS[args.protocol]
    cpi = args.captions_per_image or None
    # Check the split against the protocol before any feature is computed; read it once.
    source = read_split(args.dataset, args.split, captions_per_image=cpi)
    check_protocol(protocol, source.caption_image, source.num_images, source.captions_per_image,
                   f"{source.root}, split {args.split!r}")
    spec.require_source(source.image_features is not None, f"{source.root}, split {args.split!r}")
    features = feature_options(args, spec)
    dataset = shard.main_first(lambda: open_dataset(  # rank 0 fills the feature cache, the others read it
        args.dataset, args.split, features, cache_dir=args.cache, captions_per_image=cpi, source=source,
        progress=shard.main))

    result = evaluate(model, dataset, protocol, mode=args.mode, device=device, precision=args.precision,
                      max_rank=None if args.full_ranks else DEFAULT_MAX_RANK, shortlist_k=args.shortlist_k,
                      ties=args.ties, feature_spec=spec, shard=shard)
    if not shard.main:  # every rank has the same result; one writes and prints it
        return 0
    out = require_results_file(args.out or default_results_path(args.checkpoint, args.split, result))
    write_results(out, result, checkpoint=str(args.checkpoint.resolve()),
                  dataset_root=str(source.root), feature_spec=spec.to_dict())

    print(f"{dataset.name}, split {args.split}: {result.images:,} images, {result.captions:,} captions; "
          f"protocol {protocol.name}, mode {args.mode}, {result.precision} ({result.precision_reason}), "
          f"ties {args.ties}")
    print(f"features: {spec.describe()}")
    print(f"{result.pair_passes:,} cross-unit pair passes ({100 * result.pair_fraction:.2f}% of exhaustive), "
          f"{result.seconds:.1f} s")
    print(format_table({f"{dataset.name}/{args.split}": result.metrics}))
    print(f"results: {out}")
    return 0
