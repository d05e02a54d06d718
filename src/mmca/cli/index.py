"""`mmca index`: build (or append to) a persistent search index of a gallery."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmca.cli.features import add_feature_arguments, feature_request, positive_int
from mmca.errors import MmcaError

NAME = "index"
HELP = "build a search index of a gallery (a dataset split or a folder of images), or add images to one"
DESCRIPTION = """\
Build a search index: per image, what the scoring engine needs (projected regions R, i0 and the
cross unit's per-image Q/K/V and softmax statistics; float16 by default) as memory-mapped .npy
shards, and the metadata (file paths, captions, checkpoint sha256, backbone and text encoder)
in SQLite. Region and token features are computed as the checkpoint's were in training (its
feature spec: backbone, input size, grid, text encoder, token limit); a flag that contradicts
the spec is refused.

  mmca index --checkpoint CKPT --out DIR --dataset ROOT --split dev   a prepared split
  mmca index --checkpoint CKPT --out DIR --images FOLDER [--captions captions.tsv]
  mmca index --index DIR --add photo.jpg more/ [--captions FILE]     append, no rebuild

An index is built in a hidden sibling directory and renamed into place when complete; --add
writes a new shard and registers it in one SQLite transaction; an image it already holds (by
resolved path) or a caption it holds is skipped, checked again under the write lock, so
repeated and concurrent --add runs store each once. An interrupted run leaves
nothing that later runs trust, and the next build removes what a killed one left. --out must
be new, an empty folder or (with --overwrite) an index: any other folder or file, the current
directory and the input folder are refused and left as they are. Searching with another
checkpoint than the index's is refused.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, help="checkpoint (required to build; --add defaults to the index's)")
    p.add_argument("--out", type=Path, metavar="DIR", help="index directory to create")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", type=Path, metavar="ROOT", help="a dataset folder (images or precomp layout)")
    src.add_argument("--images", type=Path, metavar="FOLDER", help="a folder of image files")
    p.add_argument("--split", default="dev", help="split of --dataset (default: dev)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="index only the first N images of the split")
    p.add_argument("--captions", type=Path, metavar="FILE",
                   help="captions: a TSV `filename<TAB>caption`, or plain lines (a caption set of no image)")
    p.add_argument("--index", type=Path, metavar="DIR", help="existing index (with --add)")
    p.add_argument("--add", nargs="*", type=Path, metavar="PATH", help="image files or folders to append to --index")
    p.add_argument("--storage", default=None, choices=["fp16", "fp32"], help="tensor storage (default: fp16)")
    add_feature_arguments(p, adopts=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out index (only an index)")
    p.add_argument("--json", action="store_true", help="print the index summary as JSON")


def run(args: argparse.Namespace) -> int:
    from mmca.search import GalleryIndex, add_to_index, build_from_dataset, build_from_folder

    if args.add is not None:
        if args.index is None:
            raise MmcaError("--add needs --index DIR (the index to append to)")
        if not args.add and args.captions is None:
            raise MmcaError("--add needs image files/folders, or --captions FILE")
        given = [f for f in ("backbone", "image_size", "grid", "text_encoder", "max_tokens", "extract_precision",
                             "storage")
                 if getattr(args, f) is not None]
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise MmcaError(f"--add uses the index's own features and storage; {flags} cannot change them",
                            "leave these flags out, or build a new index")
        n_img, n_cap = add_to_index(args.index, args.add, args.checkpoint, args.captions)
        summary = GalleryIndex(args.index).describe()
        summary.update({"added_images": n_img, "added_captions": n_cap})
    else:
        if args.out is None or args.checkpoint is None:
            raise MmcaError("building an index needs --out DIR and --checkpoint CKPT",
                            "or pass --index DIR --add PATH... to append to an existing one")
        common = dict(storage=args.storage or "fp16", features=feature_request(args), overwrite=args.overwrite)
        if args.dataset is not None:
            if args.captions is not None:
                raise MmcaError("--captions applies to --images; a dataset brings its own captions")
            idx = build_from_dataset(args.out, args.checkpoint, args.dataset, args.split, limit=args.limit, **common)
        elif args.images is not None:
            idx = build_from_folder(args.out, args.checkpoint, args.images, args.captions, **common)
        else:
            raise MmcaError("say what to index: --dataset ROOT [--split S] or --images FOLDER")
        summary = idx.describe()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        extra = ""
        if "added_images" in summary:
            images, captions = summary["added_images"], summary["added_captions"]
            extra = f" (+{images} image{'' if images == 1 else 's'}, +{captions} caption{'' if captions == 1 else 's'})"
        print(f"index {summary['path']}: {summary['images']} images, {summary['captions']} captions{extra}, "
              f"{summary['bytes'] / 2**20:.1f} MiB of tensors ({summary['storage']}), "
              f"checkpoint sha256 {summary['checkpoint']['sha256'][:12]}")
    return 0
