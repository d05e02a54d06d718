"""The extractors' precision: chosen from the CPU's flags, recorded in the feature spec (a cache,
model or index made another way is refused), and within a stated cosine of fp32 on real photos
and captions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmca import hardware
from mmca.data.spec import FeatureSpec
from mmca.errors import CheckpointError, MmcaError
from mmca.features.backbone import ImageBackbone
from mmca.features.options import FeatureOptions, FeatureRequest, extraction_options
from mmca.features.precision import ExtractPrecision, resolve_extract_precision
from mmca.features.prepare import prepare_split
from mmca.features.text_encoder import TextEncoder

INT8 = ExtractPrecision("fp32", "int8")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture
def flags(monkeypatch: pytest.MonkeyPatch):
    """Pretend the CPU has these feature flags, with no instruction-set cap on the process."""
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")

    def given(*names: str) -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: set(names))

    return given


def test_auto_takes_bf16_with_bf16_units_int8_with_vnni_and_fp32_elsewhere(flags, monkeypatch) -> None:
    flags("avx2", "avx512f", "avx512_vnni", "amx_bf16")
    choice = resolve_extract_precision("auto")
    assert (choice.image, choice.text) == ("bf16", "bf16") and "amx_bf16" in choice.reason
    flags("avx2", "avx512f", "avx512_vnni")
    choice = resolve_extract_precision("auto")
    assert (choice.image, choice.text) == ("fp32", "int8") and "avx512_vnni" in choice.reason
    flags("avx2", "fma")
    choice = resolve_extract_precision("auto")
    assert (choice.image, choice.text) == ("fp32", "fp32") and "no VNNI" in choice.reason
    flags("avx2", "avx512f", "avx512_vnni", "amx_bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # held below bf16: fbgemm keeps its VNNI kernels
    choice = resolve_extract_precision("auto")
    assert (choice.image, choice.text) == ("fp32", "int8")
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")  # and below VNNI: a CPU without either
    choice = resolve_extract_precision("auto")
    assert (choice.image, choice.text) == ("fp32", "fp32") and "fbgemm runs below it" in choice.reason


def test_explicit_choices_and_a_bad_one(flags) -> None:
    flags("avx2")
    assert resolve_extract_precision("fp32") == ExtractPrecision(reason="fp32: as asked")
    int8 = resolve_extract_precision("int8")
    assert (int8.image, int8.text) == ("fp32", "int8")  # the trunks have no Linear layers to quantise
    with pytest.raises(MmcaError, match="fp16") as err:
        resolve_extract_precision("fp16")
    assert "--extract-precision" in (err.value.hint or "")
    with pytest.raises(MmcaError, match="int8"):
        ImageBackbone(precision="int8")


def test_the_spec_records_each_sides_precision_and_old_specs_read_as_fp32() -> None:
    spec = FeatureSpec.from_extractors(ImageBackbone(precision="bf16"), TextEncoder(precision="int8"))
    assert (spec.image.precision, spec.text.precision) == ("bf16", "int8")
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    assert "in bf16" in spec.describe() and "in int8" in spec.describe()
    old = spec.to_dict()
    del old["image"]["precision"], old["text"]["precision"]
    fp32 = FeatureSpec.from_extractors(ImageBackbone(), TextEncoder())
    assert FeatureSpec.from_dict(old).differences(fp32) == []
    assert spec.differences(fp32) == ["image precision: 'bf16' vs 'fp32'", "text precision: 'int8' vs 'fp32'"]


def test_a_cache_made_in_int8_is_its_own_entry_and_a_model_of_fp32_features_refuses_it(
        make_dataset, tmp_path: Path) -> None:
    root, store = make_dataset(3), tmp_path / "cache"
    fp32 = prepare_split(root, "dev", cache_dir=store, progress=False)
    int8 = prepare_split(root, "dev", FeatureOptions(precision=INT8), cache_dir=store, progress=False)
    assert [e.kind for e in int8.entries if not e.reused] == ["text"]  # the images (fp32 either way) are shared
    assert int8.dataset.spec.text.precision == "int8" and int8.entries[-1].path != fp32.entries[-1].path
    assert all(e.reused for e in prepare_split(root, "dev", cache_dir=store, progress=False).entries)
    with pytest.raises(CheckpointError, match="text precision: 'fp32' vs 'int8'"):
        fp32.dataset.spec.require_match(int8.dataset.spec, "the model", "the features")
    with pytest.raises(CheckpointError, match="--extract-precision int8") as err:
        extraction_options(fp32.dataset.spec, FeatureRequest(precision="int8"))  # a flag against the model's spec
    assert "leave these flags out" in (err.value.hint or "")
    adopted = extraction_options(int8.dataset.spec)
    assert adopted.precision.text == "int8"  # a later job recomputes the model's own features
    again = prepare_split(root, "dev", adopted, cache_dir=store, progress=False)
    assert all(e.reused for e in again.entries) and again.dataset.spec.differences(int8.dataset.spec) == []


def test_int8_and_bf16_token_states_stay_close_to_fp32(flickr_captions: dict[str, list[str]]) -> None:
    captions = [text for texts in list(flickr_captions.values())[:4] for text in texts]  # 20 real captions
    fp32 = TextEncoder("minilm").encode(captions).states
    int8 = cosines(fp32, TextEncoder("minilm", precision="int8").encode(captions).states)
    bf16 = cosines(fp32, TextEncoder("minilm", precision="bf16").encode(captions).states)
    assert int8.mean() > 0.99 and int8.min() > 0.97, (int8.mean(), int8.min())
    assert bf16.mean() > 0.999 and bf16.min() > 0.99, (bf16.mean(), bf16.min())
    assert int8.mean() < 0.99999  # the quantised model did run


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite2"])
def test_bf16_regions_stay_close_to_fp32(name: str, make_dataset) -> None:
    root = make_dataset(3)
    fp32, bf16 = ImageBackbone(6, name), ImageBackbone(6, name, precision="bf16")
    photos = torch.from_numpy(np.stack([fp32.load_image(p) for p in sorted((root / "images").iterdir())]))
    photos = photos.permute(0, 3, 1, 2)
    drift = cosines(fp32.extract_grid(photos).numpy(), bf16.extract_grid(photos).numpy())
    assert drift.mean() > 0.99 and drift.min() > 0.95, (drift.mean(), drift.min())
    assert drift.mean() < 0.99999  # bf16 did run


def test_int8_mpnet_token_states_stay_close_to_fp32(flickr_captions: dict[str, list[str]], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMCA_CACHE_DIR", str(tmp_path / "cache"))
    captions = [text for texts in list(flickr_captions.values())[:4] for text in texts]
    fp32 = TextEncoder("mpnet").encode(captions).states
    int8 = cosines(fp32, TextEncoder("mpnet", precision="int8").encode(captions).states)
    assert int8.mean() > 0.98 and int8.min() > 0.95, (int8.mean(), int8.min())
