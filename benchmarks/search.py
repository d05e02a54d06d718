"""Search latency, load and gallery-size growth; see mmca.search.benchmark."""

from mmca.search.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
