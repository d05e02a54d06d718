#!/usr/bin/env bash
# The main job on the Flickr8k sample (../shared/data/flickr8k, or MMCA_SAMPLE=DIR): set up, then prepare, train and evaluate.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh"
cd "$root"  # runs go to ./runs (ignored) whatever the caller's directory
data="${MMCA_SAMPLE:-$root/../shared/data/flickr8k}"
exec "$root/.venv/bin/mmca" sample "$data" "$@"
