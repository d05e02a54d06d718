"""Search latency, load and gallery-size growth; same as `mmca bench --search` (see
docs/benchmarks.md, "Search").

    python benchmarks/search.py --data ROOT [--sizes 10000] [--queries 50] [--load-seconds 30] ...
"""

import sys

from mmca.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--search", *sys.argv[1:]]))
