"""The Python API (`mmca.load`, galleries, score/topk/search, open_index) and model directories
(`mmca export`), on real Flickr8k photos with the real backbone and text encoder (small random
weights: what is checked is that every path computes the same thing), and on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmca
from mmca.cli import main
from mmca.errors import CheckpointError, DataError, MmcaError, NonFiniteError
from mmca.export import export_model_dir

QUERY = "a black dog runs through the snow"


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory) -> Path:
    return export_model_dir(checkpoint, tmp_path_factory.mktemp("export") / "model", command="pytest")


@pytest.fixture(scope="module")
def retriever(model_dir):
    return mmca.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def photos(gallery) -> list[Path]:
    return sorted(gallery.glob("*.jpg"))


@pytest.fixture(scope="module")
def images(retriever, photos):
    return retriever.encode_images(photos)


def run(*argv: str, code: str | None = None) -> str:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "mmca", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_three_lines_in_a_fresh_interpreter_equal_mmca_search(model_dir, gallery, photos, tmp_path):
    index = tmp_path / "index"
    run("index", "--checkpoint", str(model_dir), "--images", str(gallery), "--out", str(index), "--storage", "fp32")
    cli = json.loads(run("search", QUERY, "--index", str(index), "-k", "5", "--json"))["results"]
    api = json.loads(run(code=(
        "import json, mmca\n"
        f"r = mmca.load({str(model_dir)!r})\n"
        f"hits = r.search({QUERY!r}, r.encode_images({[str(p) for p in photos]!r}), k=5)\n"
        "print(json.dumps([[h.item, h.score] for h in hits]))")))
    assert [name for name, _ in api] == [r["name"] for r in cli]
    assert np.allclose([s for _, s in api], [r["score"] for r in cli], atol=1e-5, rtol=0)


def test_open_index_runs_the_queries_of_mmca_search(model_dir, gallery, retriever, images, tmp_path):
    from mmca.search import build_from_folder

    build_from_folder(tmp_path / "index", model_dir, gallery, storage="fp32", progress=False)
    results, _ = mmca.open_index(tmp_path / "index").search_text(QUERY, 3)
    hits = retriever.search(QUERY, images, k=3)
    assert [r["name"] for r in results] == [h.item for h in hits]
    assert np.allclose([r["score"] for r in results], [h.score for h in hits], atol=1e-5)


def test_score_topk_and_search_agree(retriever, images):
    texts = retriever.encode_texts([QUERY, "two children play in the water", "a man rides a bike"])
    s = retriever.score(images, texts)
    assert s.shape == (len(images), 3) and torch.isfinite(s).all()
    scores, ids = retriever.topk(texts, images, k=4)  # sentences -> images
    for j in range(3):
        best = torch.sort(s[:, j], descending=True, stable=True)
        assert ids[j].tolist() == best.indices[:4].tolist()
        assert torch.allclose(scores[j], best.values[:4], atol=1e-5)
    scores, ids = retriever.topk(images, texts, k=10)  # images -> sentences: k is capped at 3
    assert ids.shape == (len(images), 3) and (ids[:, 0] == s.argmax(1)).all()
    hits = retriever.search(QUERY, images, k=5)
    assert [h.index for h in hits] == torch.sort(s[:, 0], descending=True, stable=True).indices[:5].tolist()
    assert hits[0].item == images.names[hits[0].index]
    assert hits[0].score == pytest.approx(float(s[:, 0].max()), abs=1e-5)


def test_a_photo_queries_sentences_and_pil_images_equal_files(retriever, images, photos):
    texts = retriever.encode_texts(["a dog", "a beach", "a city street at night"])
    by_file = retriever.search(photos[0], texts, k=3)
    with Image.open(photos[0]) as im:
        by_pil = retriever.search(im, texts, k=3)
    assert [h.index for h in by_file] == [h.index for h in by_pil]
    assert np.allclose([h.score for h in by_file], [h.score for h in by_pil], atol=1e-6)
    # a folder is its photos, in name order
    assert retriever.encode_images(photos[0].parent).names == images.names


def test_region_arrays_are_a_gallery_of_the_same_images(retriever, images, photos):
    regions = retriever._extract(photos[:3], batch_size=8, progress=False)
    arrays = retriever.encode_images(regions.numpy())
    texts = retriever.encode_texts([QUERY])
    assert torch.allclose(retriever.score(arrays, texts), retriever.score(images, texts)[:3], atol=1e-6)
    assert arrays.names == ["0", "1", "2"]


def test_heatmap_of_a_result(retriever, images):
    hit = retriever.search(QUERY, images, k=1)[0]
    hm = retriever.heatmap(QUERY, images, hit.index)
    assert hm["tokens"][0] == "[CLS]" and "dog" in hm["tokens"] and hm["grid"] == 6
    assert hm["weights"].shape == (len(hm["tokens"]), 36)
    # each token attends over the regions and the sentence's own tokens: the regions get part of it
    assert torch.allclose(hm["weights"].sum(1), hm["region_mass"]) and (0 < hm["region_mass"]).all()
    assert (hm["region_mass"] <= 1 + 1e-5).all()
    assert hm["score"] == pytest.approx(hit.score, abs=1e-5)


@pytest.mark.parametrize("bad, message", [
    ([], "no images to encode"),
    (["/nonexistent/photo.jpg"], "image not found"),
    ([42], "cannot encode int"),
    (np.zeros((2, 36, 99), np.float32), r"\(N, 36, 1280\)"),
    (np.zeros((0, 36, 1280), np.float32), r"\(N, 36, 1280\)"),
])
def test_encode_images_refuses_bad_input(retriever, bad, message):
    with pytest.raises(DataError, match=message):
        retriever.encode_images(bad)


def test_a_file_that_is_not_an_image_is_refused_by_content(retriever, tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_text("not a photo")
    with pytest.raises(DataError, match="not an image"):
        retriever.encode_images([fake])


def test_nan_regions_are_refused(retriever):
    regions = np.zeros((2, 36, 1280), np.float32)
    regions[1, 3, 7] = np.nan
    with pytest.raises(NonFiniteError, match="image 1"):
        retriever.encode_images(regions)


@pytest.mark.parametrize("bad, message", [
    ([], "no sentences"),
    (["a dog", "  "], "sentence 1 is empty"),
    (["a dog", None], "sentence 1 is a NoneType"),
    ("a dog runs", "not one string"),
])
def test_encode_texts_refuses_bad_input(retriever, bad, message):
    with pytest.raises(DataError, match=message):
        retriever.encode_texts(bad)


def test_a_gallery_of_another_model_is_refused(retriever, other_checkpoint, images):
    other = mmca.load(other_checkpoint, device="cpu")
    with pytest.raises(MmcaError, match="encoded by another model"):
        other.search(QUERY, images)
    with pytest.raises(DataError, match="cannot search a TextGallery with a sentence"):
        retriever.search(QUERY, retriever.encode_texts(["a dog"]))
    with pytest.raises(DataError, match="k must be a positive integer"):
        retriever.topk(retriever.encode_texts(["a dog"]), images, k=0)


def test_model_directory_holds_config_weights_and_card(model_dir, checkpoint):
    assert sorted(p.name for p in model_dir.iterdir()) == [".mmca-folder.json", "README.md", "config.json",
                                                           "model.safetensors"]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["format"] == "mmca-model-dir-v1" and config["feature_spec"]["image"]["grid"] == 6
    assert config["mmca_version"] == mmca.__version__ and config["command"] == "pytest"
    assert "mobilenet_v2 352 px, grid 6" in (model_dir / "README.md").read_text()
    a, b = mmca.load(checkpoint, device="cpu").model.state_dict(), mmca.load(model_dir, device="cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_refuses_to_overwrite_and_leaves_nothing_behind(checkpoint, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MmcaError, match="already exists"):
        export_model_dir(checkpoint, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and [p.name for p in tmp_path.iterdir()] == ["model"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(MmcaError, match="cannot write"):  # a file where a folder must go
        export_model_dir(checkpoint, tmp_path / "file" / "model")


def test_export_checks_the_model_first(checkpoint, tmp_path):
    payload = torch.load(checkpoint, weights_only=True)
    payload["model"]["cross.ffn.0.weight" if "cross.ffn.0.weight" in payload["model"] else
                     next(iter(payload["model"]))].view(-1)[0] = float("nan")
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(NonFiniteError):
        export_model_dir(tmp_path / "nan.pt", tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_exported_config_holds_no_local_paths(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["feature_spec"]["text"]["model_dir"] is None
    assert set(config["source"]) == {"file", "sha256"} and "/" not in config["source"]["file"]


def test_weights_converted_to_fp16_load_as_float32(model_dir, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from mmca.checkpoint import file_sha256

    half = tmp_path / "half"
    shutil.copytree(model_dir, half)
    with safe_open(half / "model.safetensors", framework="pt") as f:
        header = f.metadata()
    weights = load_file(half / "model.safetensors")
    save_file({k: v.half() for k, v in weights.items()}, str(half / "model.safetensors"), metadata=header)
    with pytest.raises(CheckpointError, match="weights_sha256 differs"):  # converted: other weights
        mmca.load(half, device="cpu")
    config = json.loads((half / "config.json").read_text())
    config["weights_sha256"] = file_sha256(half / "model.safetensors")  # converted on purpose
    (half / "config.json").write_text(json.dumps(config))
    r = mmca.load(half, device="cpu")
    assert all(p.dtype == torch.float32 for p in r.model.parameters())
    assert torch.isfinite(r.score(r.encode_images(np.zeros((1, 36, 1280), np.float32)), r.encode_texts(["a"]))).all()


def test_a_training_run_folder_is_not_a_model_directory(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"epochs": 8}')
    (run_dir / "best.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"neither a checkpoint file nor a model directory(?s:.*)best\.pt"):
        mmca.load(run_dir)


@pytest.mark.parametrize("call, message", [
    (lambda r, g: r.topk(r.encode_texts(["a"]), g, k=np.int64(2)), None),  # numpy integers are integers
    (lambda r, g: r.heatmap("a dog", g, 0.7), "index must be an integer"),
    (lambda r, g: r.heatmap("a dog", g, True), "index must be an integer"),
    (lambda r, g: r.encode_texts(None), "not NoneType"),
    (lambda r, g: r.encode_images(None), "cannot encode NoneType"),
    (lambda r, g: r.search(str(g.paths[0]), r.encode_texts(["a"])), "with a sentence"),  # a str is a sentence
])
def test_more_bad_input_gets_clear_errors(retriever, images, call, message):
    if message is None:
        call(retriever, images)
        return
    with pytest.raises(DataError, match=message):
        call(retriever, images)


def test_load_options_are_checked(checkpoint):
    from mmca.errors import ConfigError

    with pytest.raises(ConfigError, match="precision must be one of"):
        mmca.load(checkpoint, precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(MmcaError, match="no CUDA device"):
            mmca.load(checkpoint, device="cuda")
    assert "load" in dir(mmca) and "Retriever" in dir(mmca)


def test_a_model_directory_is_never_unpickled(model_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    torch.save({"x": torch.zeros(1)}, bad / "model.safetensors")  # a pickle where safetensors belong
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        mmca.load(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        mmca.load(bad)
    shutil.copy(model_dir / "config.json", bad / "config.json")
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks model.safetensors"):
        mmca.load(bad)


def test_an_exported_model_evaluates_as_its_checkpoint(tmp_path):
    from mmca.checkpoint import save_checkpoint
    from mmca.config import ModelConfig
    from mmca.data.spec import FeatureSpec, precomp_image_spec, text_spec
    from mmca.features import TextEncoder
    from mmca.model import MMCA
    from test_dist import precomp_dataset

    root = tmp_path / "precomp"
    precomp_dataset(root, np.random.default_rng(0))
    spec = FeatureSpec(precomp_image_spec(root / "dev_ims.npy", (8, 4, 8), "float32"), text_spec(TextEncoder("minilm")))
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "best.pt", MMCA(ModelConfig(img_dim=8, txt_dim=384, d=32, heads=4)), spec)
    exported = export_model_dir(ckpt, tmp_path / "model")
    common = ["evaluate", str(root), "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    assert main([*common, "--checkpoint", str(ckpt), "--out", str(tmp_path / "a.json")]) == 0
    assert main([*common, "--checkpoint", str(exported), "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["metrics"] == b["metrics"]
    with pytest.raises(MmcaError, match="region features"):  # a precomp model takes no photos
        mmca.load(exported).encode_images([Image.new("RGB", (64, 64))])
