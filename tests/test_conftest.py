"""The suite's strict mode (tests/conftest.py): under MMCA_REQUIRE_ALL=1 or CI=true a skip fails the run with
its reason, except a test marked optional. Run as a real pytest process on a tiny test file
beside a copy of the suite's conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TINY = '''
import pytest
from conftest import shared_path

def test_needs_the_sample():
    shared_path("no-such-dataset")

def test_needs_playwright():
    pytest.importorskip("no_such_module_for_this_test", reason="the playwright package is not installed")

@pytest.mark.optional
@pytest.mark.skipif(True, reason="an optional extra")
def test_optional():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_known_failure():
    assert False

def test_plain():
    pass
'''


def run_tiny(tmp_path: Path, strict: dict[str, str]) -> subprocess.CompletedProcess:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_tiny.py").write_text(TINY)
    env = {k: v for k, v in os.environ.items() if k not in ("MMCA_REQUIRE_ALL", "CI")}
    env["MMCA_SHARED_DATA"] = str(tmp_path / "absent")
    env.update(strict)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def counts(out: str) -> dict[str, int]:
    """pytest's last line ("1 failed, 2 passed, ... in 0.5s") as {outcome: count}."""
    last = out.strip().splitlines()[-1].rsplit(" in ", 1)[0]
    return {word: int(n) for n, word in (part.split() for part in last.split(", "))}


def test_without_strict_mode_missing_parts_skip_with_their_reason(tmp_path):
    run = run_tiny(tmp_path, strict={})
    assert run.returncode == 0, run.stdout + run.stderr
    assert counts(run.stdout) == {"passed": 1, "skipped": 3, "xfailed": 1}, run.stdout
    assert "shared sample data not found" in run.stdout


@pytest.mark.parametrize("name, reason", [("test_needs_the_sample", "shared sample data not found"),
                                          ("test_needs_playwright", "the playwright package is not installed")])
@pytest.mark.parametrize("strict", [{"MMCA_REQUIRE_ALL": "1"}, {"CI": "true"}], ids=["MMCA_REQUIRE_ALL", "CI"])
def test_strict_mode_fails_each_skip_with_its_reason(tmp_path, name, reason, strict):
    run = run_tiny(tmp_path, strict=strict)
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    assert f"FAILED test_tiny.py::{name}" in out and "MMCA_REQUIRE_ALL=1 or CI=true, but this test would skip" in out
    assert reason in out
    # the optional test still skips; an expected failure and a plain test are untouched
    assert counts(out) == {"failed": 2, "passed": 1, "skipped": 1, "xfailed": 1}, out
