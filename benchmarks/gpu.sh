#!/usr/bin/env bash
# The prepared run on a GPU machine (see benchmarks/gpu.py for what it measures):
#   ./scripts/bootstrap.sh && benchmarks/gpu.sh            # on a GPU machine, < 10 minutes
#   benchmarks/gpu.sh --cpu-smoke                           # the same steps at toy size on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/gpu.py "$@"
