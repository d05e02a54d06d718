"""Lint: ruff, with the rules and the exceptions of pyproject.toml ([tool.ruff]), finds nothing in
src, tests and benchmarks. Ruff comes with the test extra, so it is not an optional skip: under
MMCA_REQUIRE_ALL=1 a missing ruff fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_ruff(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    ruff = pytest.importorskip("ruff", reason="ruff is not installed (it comes with the test extra: "
                                              "pip install -e '.[test]')")
    return subprocess.run([ruff.find_ruff_bin(), "check", "--no-cache", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_ruff_finds_nothing():
    done = run_ruff("src", "tests", "benchmarks")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_configured_rules_apply():
    """The check above reads the project's configuration: in a file under src/ it finds an unused
    import (F401) and a line over 120 characters (E501)."""
    source = "import os\n\nVALUE = '" + "x" * 120 + "'\n"
    done = run_ruff("--stdin-filename", "src/mmca/example.py", "-", stdin=source)
    assert done.returncode == 1 and "F401" in done.stdout and "E501" in done.stdout, done.stdout + done.stderr
