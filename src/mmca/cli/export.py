"""`mmca export`: a checkpoint as a self-describing model directory (safetensors + JSON)."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "export"
HELP = "write a checkpoint as a model directory: config.json, model.safetensors, a model card"
DESCRIPTION = """\
  mmca export runs/sample/mmca/best.pt models/mmca-flickr8k

The directory holds config.json (model config, feature spec, training config, the dev metrics
the checkpoint was chosen on, the mmca version), model.safetensors (the weights) and README.md
(a model card). `mmca.load(DIR)` and every command that takes --checkpoint accept it; loading
it never unpickles anything. The model is loaded and checked (shapes, finite weights) before
anything is written. DIR must not exist yet.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                   help="a .pt file written by `mmca train` (or another model directory)")
    p.add_argument("out", type=Path, metavar="DIR", help="the model directory to write (must not exist yet)")
    p.add_argument("--made-with", default=None, metavar="COMMAND",
                   help="the command that trained the model (shown in the model card)")


def run(args: argparse.Namespace) -> int:
    from mmca.export import export_model_dir

    out = export_model_dir(args.checkpoint, args.out, command=args.made_with)
    print(f"model directory: {out} (config.json, model.safetensors, README.md)")
    return 0
