"""The feature spec: recorded by training, adopted by evaluate / index / bench / --init-from,
and every contradiction refused with a message that says what differs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from mmca.checkpoint import checkpoint_spec, read_checkpoint, save_checkpoint
from mmca.config import ModelConfig
from mmca.data.spec import FeatureSpec
from mmca.errors import CheckpointError
from mmca.features import FeatureOptions, FeatureRequest, ImageBackbone, TextEncoder, extraction_options, open_dataset
from mmca.model import MMCA


@pytest.fixture(scope="module")
def spec6(backbone, encoder) -> FeatureSpec:
    return FeatureSpec.from_extractors(backbone, encoder)


@pytest.fixture(scope="module")
def spec7(backbone, encoder) -> FeatureSpec:
    return FeatureSpec.from_extractors(ImageBackbone(7, backbone.name), encoder)


# The fast extractors, as the `spec6` / `spec7` fixtures name them.
FAST = FeatureOptions(backbone="mobilenet_v2", text_encoder="minilm")


def small_model(txt_dim: int = 384) -> MMCA:
    torch.manual_seed(0)
    return MMCA(ModelConfig(img_dim=1280, txt_dim=txt_dim, d=32, heads=4, cnn_filters=8)).eval()


def cli(*argv) -> int:
    from mmca.cli import main

    return main([str(a) for a in argv])


def test_round_trip_and_differences(spec6, spec7):
    assert FeatureSpec.from_dict(json.loads(json.dumps(spec6.to_dict()))) == spec6
    assert spec6.differences(spec6.with_mirror(True)) == []  # provenance, not identity
    assert spec6.differences(spec7) == ["image regions: 36 vs 49", "image grid: 6 vs 7"]
    old = replace(spec6, image=replace(spec6.image, image_size=224))  # before the 352 px change
    assert spec6.differences(old) == ["image image_size: 352 vs 224"]
    short = replace(spec6, text=replace(spec6.text, max_tokens=32, model_dir="/elsewhere"))
    assert spec6.differences(short) == ["text max_tokens: 64 vs 32"]  # the directory is provenance
    # features of unknown provenance match on shapes alone
    assert FeatureSpec.of_arrays(36, 1280, 384).differences(spec6) == []
    assert FeatureSpec.of_arrays(49, 1280, 384).differences(spec6) == ["image regions: 49 vs 36"]
    with pytest.raises(CheckpointError, match="malformed feature spec"):
        FeatureSpec.from_dict({"image": 3})


def test_options_adopt_the_spec_and_refuse_contradictions(spec7):
    opts = extraction_options(spec7)
    assert opts.grid == 7 and opts.max_tokens == 64
    assert opts.text_encoder == spec7.text.model_dir
    assert extraction_options(spec7, FeatureRequest(grid=7)) == opts
    with pytest.raises(CheckpointError, match="--grid 6 .*trained on grid 7"):
        extraction_options(spec7, FeatureRequest(grid=6))
    with pytest.raises(CheckpointError, match="--max-tokens 32"):
        extraction_options(spec7, FeatureRequest(max_tokens=32))


def test_a_grid7_checkpoint_is_evaluated_on_grid7_features(make_dataset, spec7, tmp_path):
    root = make_dataset(6)
    ckpt = save_checkpoint(tmp_path / "run" / "best.pt", small_model(), spec7)
    out = tmp_path / "eval.json"
    assert cli("evaluate", root, "--checkpoint", ckpt, "--cache", tmp_path / "cache", "--out", out) == 0
    result = json.loads(out.read_text())
    assert result["feature_spec"]["image"]["grid"] == 7 and result["precision"] == "fp32"
    ds = open_dataset(root, "dev", replace(FAST, grid=7), cache_dir=tmp_path / "cache", progress=False)
    assert ds.image_features.shape[1] == 49 and ds.spec.differences(spec7) == []
    # a contradicting flag is refused, not obeyed
    assert cli("evaluate", root, "--checkpoint", ckpt, "--cache", tmp_path / "cache", "--grid", "6") == 2


def test_clear_errors_for_old_and_mismatched_checkpoints(make_dataset, spec6, tmp_path, capsys):
    root = make_dataset(6)
    ckpt = save_checkpoint(tmp_path / "ok.pt", small_model(), spec6)
    payload = read_checkpoint(ckpt)
    legacy = tmp_path / "legacy.pt"
    torch.save({k: v for k, v in payload.items() if k != "feature_spec"}, legacy)
    assert cli("evaluate", root, "--checkpoint", legacy, "--cache", tmp_path / "cache") == 2
    assert "records no feature spec" in capsys.readouterr().err
    assert not list(tmp_path.glob("eval-*.json"))

    # a model of 224 px features gets 224 px features (the spec's input size is adopted) ...
    old = replace(spec6, image=replace(spec6.image, image_size=224))
    ckpt224 = save_checkpoint(tmp_path / "old224.pt", small_model(), old)
    assert cli("evaluate", root, "--checkpoint", ckpt224, "--cache", tmp_path / "cache") == 0
    assert "features: mobilenet_v2 224 px, grid 6" in capsys.readouterr().out
    # ... and flags that contradict the spec are refused before any feature is computed
    assert cli("evaluate", root, "--checkpoint", ckpt224, "--cache", tmp_path / "cache", "--image-size", "352") == 2
    assert "--image-size 352 (trained at 224 px)" in capsys.readouterr().err
    assert cli("evaluate", root, "--checkpoint", ckpt224, "--backbone", "efficientnet_lite2") == 2
    assert "--backbone efficientnet_lite2 (the model was trained on mobilenet_v2 features)" in capsys.readouterr().err
    unknown = replace(spec6, image=replace(spec6.image, source="resnet152"))
    assert cli("evaluate", root, "--checkpoint", save_checkpoint(tmp_path / "r.pt", small_model(), unknown)) == 2
    assert "resnet152 features, a backbone this mmca does not know" in capsys.readouterr().err


def test_train_records_the_spec_and_init_from_checks_it(make_dataset, spec6, spec7, tmp_path):
    from mmca.config import TrainConfig
    from mmca.train import Trainer

    root = make_dataset(8)
    common = dict(cache_dir=tmp_path / "cache", progress=False)
    ds7 = open_dataset(root, "dev", replace(FAST, grid=7), **common)
    ds6 = open_dataset(root, "dev", replace(FAST, grid=6), **common)
    config = TrainConfig(model=ModelConfig(d=16, heads=2, cnn_filters=4), epochs=1, batch_size=8)
    with pytest.raises(CheckpointError, match="grid: 7 vs 6"):  # train and dev must agree
        Trainer(config, ds7, ds6, tmp_path / "mixed", progress=False, log=lambda _: None)
    run = Trainer(config, ds7, ds7, tmp_path / "g7", progress=False, log=lambda _: None)
    summary = run.run()
    recorded = checkpoint_spec(read_checkpoint(tmp_path / "g7" / "best.pt"), "best.pt")
    assert recorded.differences(spec7) == [] and summary["best_epoch"]["epoch"] == 1
    assert json.loads((tmp_path / "g7" / "config.json").read_text())["feature_spec"]["image"]["grid"] == 7
    with pytest.raises(CheckpointError, match="grid: 7 vs 6"):
        Trainer(config, ds6, ds6, tmp_path / "init", init_from=tmp_path / "g7" / "best.pt",
                progress=False, log=lambda _: None)
    # a model of one backbone refuses another backbone's cache, though every shape agrees
    lite7 = open_dataset(root, "dev", replace(FAST, grid=7, backbone="efficientnet_lite2"), **common)
    assert lite7.image_features.shape == ds7.image_features.shape
    with pytest.raises(CheckpointError, match="image source: 'mobilenet_v2' vs 'efficientnet_lite2'"):
        Trainer(config, lite7, lite7, tmp_path / "init2", init_from=tmp_path / "g7" / "best.pt",
                progress=False, log=lambda _: None)
    with pytest.raises(CheckpointError, match="image source"):  # nor may train and dev mix backbones
        Trainer(config, ds7, lite7, tmp_path / "mixed2", progress=False, log=lambda _: None)


def test_index_adopts_the_checkpoint_spec(make_dataset, spec7, tmp_path, monkeypatch):
    from mmca.search import GalleryIndex, build_from_dataset

    monkeypatch.setenv("MMCA_CACHE_DIR", str(tmp_path / "cache"))
    root = make_dataset(4)
    ckpt = save_checkpoint(tmp_path / "g7.pt", small_model(), spec7)
    idx = build_from_dataset(tmp_path / "index", ckpt, root, "dev", progress=False)
    assert GalleryIndex(idx.path).meta["feature_spec"]["image"]["grid"] == 7
    with pytest.raises(CheckpointError, match="--grid 6"):
        build_from_dataset(tmp_path / "index6", ckpt, root, "dev", features=FeatureRequest(grid=6), progress=False)


def test_a_text_encoder_of_another_width_is_refused(spec6, tmp_path):
    other = replace(spec6, text=replace(spec6.text, model_type="bert", dim=768, config_sha256="x" * 64))
    with pytest.raises(CheckpointError, match="text dim: 384 vs 768"):
        spec6.require_match(other, "the checkpoint", "the dataset")
    assert TextEncoder("minilm").dim == 384


def test_contradictions_are_refused_before_any_feature_is_computed(make_dataset, spec6, tmp_path, capsys,
                                                                    monkeypatch):
    import mmca.features.prepare as prepare

    root = make_dataset(4)
    monkeypatch.setattr(prepare, "prepare_split", lambda *a, **k: pytest.fail("features were computed"))
    other = replace(spec6, text=replace(spec6.text, config_sha256="0" * 64))  # e.g. trained with BERT-base
    ckpt = save_checkpoint(tmp_path / "bert.pt", small_model(), other)
    assert cli("evaluate", root, "--checkpoint", ckpt, "--cache", tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert "text encoder" in err and "config_sha256" in err and "--text-encoder" in err
    precomp = save_checkpoint(tmp_path / "precomp.pt", small_model(),
                              replace(spec6, image=replace(spec6.image, source="precomp", grid=None,
                                                           image_size=None, weights_sha256=None)))
    assert cli("evaluate", root, "--checkpoint", precomp, "--cache", tmp_path / "cache") == 2
    assert "holds photos" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli("prepare", root, "--max-tokens", "0")


def test_index_add_refuses_feature_flags(tmp_path, capsys):
    assert cli("index", "--index", tmp_path, "--add", tmp_path, "--grid", "7") == 2
    assert "--add uses the index's own features" in capsys.readouterr().err


def test_a_recorded_encoder_name_is_used_only_when_registered(spec6):
    """A copied model finds a registered encoder by name; any other recorded name (an edited
    file, say '../../etc') is never used as a path."""
    copied = replace(spec6, text=replace(spec6.text, model_dir=None, name="minilm"))
    assert extraction_options(copied).text_encoder == "minilm"
    edited = replace(spec6, text=replace(spec6.text, model_dir=None, name="../../etc"))
    with pytest.raises(CheckpointError, match=r"the default \(mpnet, all-mpnet-base-v2\)"):
        extraction_options(edited)  # not a path: the default encoder, checked against the spec (MiniLM's)
