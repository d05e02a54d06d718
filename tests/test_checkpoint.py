import pytest
import torch

from mmca.checkpoint import load_model, save_checkpoint
from mmca.config import ModelConfig
from mmca.data.spec import FeatureSpec
from mmca.errors import CheckpointError
from mmca.model import MMCA


def test_round_trip_keeps_weights_config_and_extra(tmp_path):
    model = MMCA(ModelConfig(img_dim=8, txt_dim=8, d=16, heads=2, cnn_filters=4))
    spec = FeatureSpec.of_arrays(36, 8, 8)
    path = save_checkpoint(tmp_path / "m.pt", model, spec, epoch=3, rsum=123.5)
    loaded, extra = load_model(path)
    assert loaded.config == model.config
    assert extra["epoch"] == 3 and extra["rsum"] == 123.5
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


def test_missing_foreign_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an mmca checkpoint"):
        load_model(tmp_path / "foreign.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "corrupt.pt")
