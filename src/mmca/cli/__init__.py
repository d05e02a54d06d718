"""The `mmca` command: one entry point, one subcommand per job.

Each subcommand lives in its own module under `mmca.cli` and exposes
`NAME`, `HELP`, `DESCRIPTION`, `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from mmca.errors import MmcaError
from mmca.runtime import retain_freed_memory

# Order is the order shown in `mmca --help`: the data flow, then the jobs.
COMMANDS = ["prepare", "train", "evaluate", "sample", "export", "bench", "index", "search", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmca",
        description="Multi-Modality Cross Attention for image-sentence matching: "
        "prepare features, train, evaluate with the standard protocol, search.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected error (a bug: please report it)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"mmca.cli.{name}")
        p = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"mmca: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    retain_freed_memory()  # every command: training and extraction reallocate as scoring does
    warnings.formatwarning = _warning_line  # one readable line, not a source location
    status = 1
    try:
        status = _run(args)
    finally:
        if "mmca.dist" in sys.modules:  # only a command that can run under torchrun joins a group
            from mmca.dist import shutdown

            if not shutdown(completed=status == 0):
                print(f"mmca {args.command}: error: another rank failed; see its message above", file=sys.stderr)
                status = status or 1
    return status


def _run(args: argparse.Namespace) -> int:
    """The command's exit status: its own, 2 for bad input, 130 when interrupted, 1 for a bug."""
    try:
        return int(args._run(args) or 0)
    except MmcaError as err:
        print(f"mmca {args.command}: error: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"  what to do: {err.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmca {args.command}: interrupted; nothing partial was kept.", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: one line, the traceback on request
        if args.debug:
            raise
        print(f"mmca {args.command}: unexpected error: {type(err).__name__}: {err}", file=sys.stderr)
        print("  what to do: run again as `mmca --debug ...` for the traceback, and report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
