"""`mmca search`: the top-k images of a sentence, or the top-k captions of an image."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmca.cli.features import positive_int
from mmca.errors import MmcaError

NAME = "search"
HELP = "search an index: images by sentence, or captions by image"
DESCRIPTION = """\
  mmca search "a dog runs on the beach" --index DIR -k 10     top-k images of a sentence
  mmca search --image photo.jpg --index DIR -k 5              top-k captions of the index's caption set

Results are exact under the full MMCA score S = i0·c0 + α·i1·c1 (the engine's pruned top-k:
the cross unit runs only on images whose bound can still reach the top k). --json prints a
machine-readable result.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", nargs="?", help="a sentence")
    p.add_argument("--image", type=Path, help="an image file: rank the index's captions instead")
    p.add_argument("--index", type=Path, required=True, metavar="DIR", help="an index written by `mmca index`")
    p.add_argument("--checkpoint", type=Path, help="default: the index's own (must be the same file contents)")
    p.add_argument("-k", type=positive_int, default=10, help="results to return (default: 10)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from mmca.search import QueryError, Searcher

    if (args.query is None) == (args.image is None):
        raise MmcaError("give either a sentence or --image FILE", 'e.g. mmca search "a dog runs" --index DIR')
    searcher = Searcher(args.index, args.checkpoint)
    try:
        if args.image is not None:
            results, stats = searcher.search_image_file(args.image, args.k)
            kind = "captions"
        else:
            results, stats = searcher.search_text(args.query, args.k)
            kind = "images"
            for r in results:
                r["path"] = searcher.index.image_paths[r["id"]]
    except QueryError as err:
        raise MmcaError(err.message, err.hint) from err
    if args.json:
        print(json.dumps({"query": args.query if args.image is None else str(args.image), "kind": kind,
                          "results": results, "ms": round(stats.ms, 2),
                          "pair_passes": stats.pair_passes}, indent=2))
        return 0
    for rank, r in enumerate(results, 1):
        what = r["text"] if kind == "captions" else (r["path"] or r["name"])
        print(f"{rank:3d}  {r['score']:+.4f}  {what}")
    return 0
