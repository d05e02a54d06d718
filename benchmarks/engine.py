"""Scoring-engine benchmark; same as `mmca bench` (see docs/benchmarks.md, "Scoring engine").

    python benchmarks/engine.py [--skip-big] [--json out.json] ...
"""

import argparse
import sys

from mmca.engine.benchmark import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="benchmarks/engine.py", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
