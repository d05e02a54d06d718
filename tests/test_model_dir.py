"""A model directory is trusted only as `mmca export` wrote it: an edited config.json or
replaced weights are refused, naming what changed, before any score is computed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import mmca
from mmca.checkpoint import file_sha256, load_model_and_spec, save_checkpoint
from mmca.config import ModelConfig
from mmca.data.spec import FeatureSpec
from mmca.errors import CheckpointError
from mmca.export import export_model_dir
from mmca.model import MMCA


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory) -> Path:
    return export_model_dir(checkpoint, tmp_path_factory.mktemp("export") / "model")


def copy_of(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "copy"))


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def test_an_exported_model_loads_and_records_both_digests(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["weights_sha256"] == file_sha256(model_dir / "model.safetensors")
    load_model_and_spec(model_dir)
    reindented = json.loads((model_dir / "config.json").read_text())  # layout is not content
    assert reindented == config


def test_a_feature_spec_edited_from_grid_6_to_7_is_refused_naming_the_field(model_dir, tmp_path):
    edited = copy_of(model_dir, tmp_path)
    edit_config(edited, lambda c: c["feature_spec"]["image"].update(grid=7, regions=49))
    with pytest.raises(CheckpointError, match=r"config.json was edited after export.*feature_spec\.image\.grid: "
                                              r"6 as written, 7 now") as err:
        mmca.load(edited)
    assert "feature_spec.image.regions: 36 as written, 49 now" in str(err.value)


def test_replaced_weights_are_refused(model_dir, other_checkpoint, tmp_path):
    mixed = copy_of(model_dir, tmp_path)
    other = export_model_dir(other_checkpoint, tmp_path / "other")
    shutil.copy(other / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors is not the file its config.json records"):
        mmca.load(mixed)


def test_a_model_directory_without_digests_is_refused(model_dir, tmp_path):
    old = copy_of(model_dir, tmp_path)
    edit_config(old, lambda c: c.pop("weights_sha256"))
    with pytest.raises(CheckpointError, match="records no digests(?s:.*)mmca export CHECKPOINT DIR"):
        mmca.load(old)


def test_a_spec_of_another_width_than_the_weights_is_refused(tmp_path):
    """Consistent digests cannot vouch for a file that contradicts itself."""
    torch.manual_seed(0)
    spec = FeatureSpec.of_arrays(4, 16, 10)
    path = save_checkpoint(tmp_path / "wide.pt", MMCA(ModelConfig(img_dim=8, txt_dim=10, d=16, heads=2)), spec)
    with pytest.raises(CheckpointError, match=r"feature_spec\.image\.dim is 16, but the weights take 8-d regions"):
        load_model_and_spec(path)
