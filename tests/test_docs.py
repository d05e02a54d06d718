"""The runnable examples in docs/ are run here, as a user would run them, so they cannot rot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


def test_the_api_example_runs_end_to_end(checkpoint, gallery, tmp_path):
    from mmca.export import export_model_dir

    export_model_dir(checkpoint, tmp_path / "runs" / "sample" / "model")
    shutil.copytree(gallery, tmp_path / "photos", ignore=shutil.ignore_patterns("*.tsv"))
    (example,) = python_blocks(DOCS / "api.md")
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(re.findall(r"^[+-]\d\.\d{4}  \S+\.jpg$", done.stdout, flags=re.M)) == 5
    # a word the tokenizer splits into pieces is found by its positions, not taken for the word "snow"
    assert "snowboarder: tokens [2, 3, 4]" in done.stdout
    png = tmp_path / "snowboarder-heatmap.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
