"""Scoring-engine benchmark; same as `mmca bench` (see docs/benchmarks.md, "Scoring engine").

    python benchmarks/engine.py [--skip-big] [--json out.json] ...
"""

import sys

from mmca.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
