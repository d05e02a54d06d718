"""Worker processes of feature extraction: progress, errors and deaths come back to the parent,
and the job ends without resource-tracker warnings (no shared semaphores)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mmca.errors import DataError
from mmca.features.parallel import run_sharded


def count(start: int, stop: int, report) -> None:
    from tqdm import tqdm

    with tqdm(total=stop - start, disable=True):  # as the real extractors do
        for _ in range(start, stop):
            report(1)


def refuse(start: int, stop: int, report) -> None:
    if start > 0:
        raise DataError(f"bad item {start}", "fix it")
    report(stop - start)


def die(start: int, stop: int, report) -> None:
    if start > 0:
        os._exit(3)


def test_progress_of_every_worker_adds_up():
    seen = []
    run_sharded(count, 10, 2, seen.append)
    assert sum(seen) == 10


def test_a_workers_error_comes_back_with_its_message_and_hint():
    with pytest.raises(DataError, match="bad item 5") as err:
        run_sharded(refuse, 10, 2, lambda n: None)
    assert err.value.hint == "fix it"


def test_a_worker_that_dies_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="died"):
        run_sharded(die, 10, 2, lambda n: None)


def test_no_resource_tracker_warning_at_exit():
    code = ("from mmca.features.parallel import run_sharded\n"
            "from test_parallel import count\n"
            "if __name__ == '__main__':\n"
            "    for _ in range(3):\n"
            "        run_sharded(count, 6, 2, lambda n: None)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resource_tracker" not in done.stderr and "leaked" not in done.stderr
