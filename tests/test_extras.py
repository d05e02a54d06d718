"""The library and the CLI work without the optional extras (serve: fastapi + uvicorn; plots:
matplotlib): importing them pulls none of those packages, a run without matplotlib writes its
log but no curves.png, and `mmca serve` without the serve extra says what to install."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Run in a child whose import system cannot find the extras' packages, as on an install
# without them (a real interpreter, with the real packages hidden rather than uninstalled).
HIDE = """
import importlib.abc, sys
HIDDEN = {"fastapi", "uvicorn", "matplotlib", "starlette"}
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, Hide())
import importlib.util
_find = importlib.util.find_spec
def find_spec(name, package=None):
    if name.split(".")[0] in HIDDEN:
        return None
    return _find(name, package)
importlib.util.find_spec = find_spec
"""


def child(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE + code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                          timeout=300)


def test_the_library_and_cli_import_without_the_extras(tmp_path):
    res = child("""
import json, sys
import mmca, mmca.api, mmca.cli, mmca.search, mmca.train
print(json.dumps(sorted(m for m in ("fastapi", "uvicorn", "matplotlib") if m in sys.modules)))
""", tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_serve_without_the_serve_extra_names_it(tmp_path):
    (tmp_path / "index").mkdir()
    res = child("""
import sys
from mmca.cli import main
sys.exit(main(["serve", "--index", "index"]))
""", tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "mmca serve needs fastapi, uvicorn" in res.stderr and "pip install 'mmca[serve]'" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_run_without_matplotlib_writes_its_log_but_no_plot(tmp_path):
    tests = Path(__file__).resolve().parent
    res = child(f"""
import sys
sys.path.insert(0, {str(tests)!r})
from test_train import TINY, train_tiny
train_tiny("run", TINY.replace(epochs=1))
""", tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"log.csv", "last.pt", "best.pt"} <= names and "curves.png" not in names
