"""The evaluation job against the metric oracle over `MMCA.forward` scores of every pair."""

import json

import numpy as np
import pytest
import torch

from mmca.config import ModelConfig
from mmca.data.dataset import RetrievalDataset, TokenFeatures
from mmca.errors import CheckpointError, DataError
from mmca.evaluate import PAPER_RESULTS, Protocol, evaluate, fold_indices, format_table, write_results
from mmca.metrics import average_folds, ranks_from_scores, retrieval_metrics
from mmca.model import MMCA

IMG_DIM, TXT_DIM = 8, 12


def synthetic(n_images: int, cpi: int = 5, seed: int = 0, shuffle: bool = False) -> RetrievalDataset:
    """Random regions and token states; with `shuffle`, captions are not in image order."""
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(n_images), cpi)
    if shuffle:
        owner = rng.permutation(owner)
    lengths = rng.integers(3, 10, size=len(owner))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    states = rng.standard_normal((offsets[-1], TXT_DIM)).astype(np.float16)
    return RetrievalDataset(
        name="synthetic", split="test", image_ids=[str(i) for i in range(n_images)],
        captions=[f"caption {j}" for j in range(len(owner))], caption_image=owner,
        captions_per_image=cpi,
        image_features=rng.standard_normal((n_images, 4, IMG_DIM)).astype(np.float32),
        token_features=TokenFeatures(states, offsets),
    )


@pytest.fixture(scope="module")
def model() -> MMCA:
    torch.manual_seed(0)
    return MMCA(ModelConfig(img_dim=IMG_DIM, txt_dim=TXT_DIM, d=32, heads=4, cnn_filters=8)).eval()


@torch.no_grad()
def all_scores(model: MMCA, ds: RetrievalDataset) -> np.ndarray:
    """S (N, M) through the plain forward pass, one image against every caption at a time."""
    tokens, mask = ds.token_features.batch(np.arange(ds.num_captions))
    rows = [model(ds.image_batch([i]).expand(ds.num_captions, -1, -1), tokens, mask)
            for i in range(ds.num_images)]
    return torch.stack(rows).numpy()


def oracle(scores: np.ndarray, owner: np.ndarray):
    return retrieval_metrics(*ranks_from_scores(scores, owner))


@pytest.mark.parametrize("mode", ["exhaustive", "exact", "shortlist"])
def test_whole_split_equals_the_oracle_over_all_pairs(model, mode):
    ds = synthetic(6)
    # A shortlist longer than the gallery re-ranks every candidate, so it is exact here too.
    result = evaluate(model, ds, "full", mode=mode, max_rank=None, shortlist_k=ds.num_captions)
    assert result.metrics == oracle(all_scores(model, ds), ds.caption_image)
    assert result.folds == []
    assert result.exhaustive_pairs == 6 * 30
    if mode == "exhaustive":
        assert result.pair_passes >= 6 * 30


def test_capped_exact_ranks_give_the_exact_recalls(model):
    ds = synthetic(12)
    result = evaluate(model, ds, "full", mode="exact")  # ranks exact below 10 only
    full = oracle(all_scores(model, ds), ds.caption_image)
    recalls = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
    assert {k: result.metrics[k] for k in recalls} == {k: full[k] for k in recalls}
    assert result.exact_below == 10
    assert result.metrics["i2t_meanr"] is None  # some image ranks are only bounds


def test_two_folds_rank_each_fold_alone_and_average(model):
    ds = synthetic(10, shuffle=True)
    protocol = Protocol("two-folds", "5 images per fold", images=10, fold_size=5, captions_per_image=5)
    result = evaluate(model, ds, protocol, mode="exhaustive", max_rank=None)

    scores = all_scores(model, ds)
    expected = []
    for lo in (0, 5):
        captions = np.flatnonzero((ds.caption_image >= lo) & (ds.caption_image < lo + 5))
        assert len(captions) == 25
        expected.append(oracle(scores[lo:lo + 5, captions], ds.caption_image[captions] - lo))
    assert result.folds == expected
    assert result.metrics == average_folds(expected)
    assert result.exhaustive_pairs == 2 * 5 * 25 <= result.pair_passes


def test_fold_indices_select_images_and_their_captions():
    owner = np.array([3, 0, 1, 2, 0, 3, 1, 2])
    (i0, c0), (i1, c1) = fold_indices(owner, 4, 2)
    assert i0 == slice(0, 2) and c0.tolist() == [1, 2, 4, 6]
    assert i1 == slice(2, 4) and c1.tolist() == [0, 3, 5, 7]
    [(i, c)] = fold_indices(owner, 4, None)
    assert i == slice(0, 4) and c.tolist() == list(range(8))


def test_split_that_does_not_fit_the_protocol_is_a_clear_error(model):
    with pytest.raises(DataError, match="10 images, but protocol 'coco1k'.*5,000"):
        evaluate(model, synthetic(10), "coco1k")
    with pytest.raises(DataError, match="1,000"):
        evaluate(model, synthetic(10), "1k")
    uneven = synthetic(3, cpi=2)
    uneven.caption_image = np.array([0, 0, 0, 1, 2, 2])
    with pytest.raises(DataError, match="6 captions for 3 images, not 2 per image"):
        evaluate(model, uneven, "full")
    with pytest.raises(DataError, match="2 captions per image, but protocol 'coco5k' needs 5"):
        evaluate(model, synthetic(5000, cpi=2), "coco5k")
    other = MMCA(ModelConfig(img_dim=IMG_DIM + 1, txt_dim=TXT_DIM, d=32, heads=4, cnn_filters=8))
    with pytest.raises(CheckpointError, match="D_img"):
        evaluate(other, synthetic(3), "full")


def test_results_json_is_written_and_parseable(model, tmp_path):
    result = evaluate(model, synthetic(4), "full", mode="exact")
    path = write_results(tmp_path / "out" / "results.json", result, checkpoint="m.pt", dataset_root="/data")
    raw = json.loads(path.read_text())
    assert raw["metrics"] == result.metrics
    assert raw["checkpoint"] == "m.pt" and raw["dataset_root"] == "/data" and raw["split"] == "test"
    assert raw["protocol"] == "full" and raw["mode"] == "exact"
    assert raw["exact_below"] == 10 and raw["shortlist_k"] is None
    assert raw["pair_passes"] == result.pair_passes
    assert 0 < raw["pair_fraction"] <= 1
    assert 0 < raw["encode_seconds"] < raw["seconds"]
    assert raw["mmca_version"]
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left


def test_table_aligns_rows_and_marks_unknown_values():
    ours = retrieval_metrics(np.array([0, 3, 12]), np.array([1, 0, 0, 2, 30, 0]), exact_below=10)
    table = format_table({"MMCA": ours, "paper (Flickr30K)": PAPER_RESULTS["Flickr30K 1K"]})
    lines = table.splitlines()
    assert lines[0].split() == ["direction", "R@1", "R@5", "R@10", "medr", "meanr", "rsum"]
    assert len(lines) == 5
    assert lines[1].split() == ["MMCA", "image->text", "33.3", "66.7", "66.7", "4.0", "-", "383.3"]
    assert lines[2].split() == ["text->image", "50.0", "83.3", "83.3", "1.0", "-"]
    assert lines[3].split() == ["paper", "(Flickr30K)", "image->text", "74.2", "92.8", "96.4", "-", "-",
                                "487.4"]
    # Numbers are right-aligned under their header.
    end = lines[0].index("R@10") + len("R@10")
    assert [line[:end].split()[-1] for line in lines] == ["R@10", "66.7", "83.3", "96.4", "87.8"]
    assert all(line[end] == " " for line in lines)


# ---------------------------------------------------------------------------- the command

SCENES = ["a dog runs across a grassy field", "two children play on a sandy beach",
          "a man rides a bicycle down a city street", "a woman in a red coat walks in the snow",
          "a group of people sit around a campfire at night", "a black cat sleeps on a windowsill"]
VIEWS = ["", " in the sunshine", " while others watch", " near the water", " on a cloudy day"]


@pytest.fixture
def precomp(tmp_path):
    """A precomp dataset with split 'dev': 6 images of 4 regions x 8 dims, 5 captions each."""
    root = tmp_path / "precomp"
    root.mkdir()
    np.save(root / "dev_ims.npy", np.random.default_rng(0).standard_normal((6, 4, 8)).astype(np.float32))
    (root / "dev_caps.txt").write_text("".join(f"{s}{v}\n" for s in SCENES for v in VIEWS))
    return root


@pytest.fixture
def checkpoint(tmp_path):
    from mmca.checkpoint import save_checkpoint
    from mmca.data.spec import FeatureSpec, precomp_image_spec, text_spec
    from mmca.features import TextEncoder

    torch.manual_seed(0)
    spec = FeatureSpec(precomp_image_spec(tmp_path / "dev_ims.npy", (6, 4, 8), "float32"),
                       text_spec(TextEncoder("minilm")))
    return save_checkpoint(tmp_path / "run" / "best.pt",
                           MMCA(ModelConfig(img_dim=8, txt_dim=384, d=32, heads=4, cnn_filters=8)), spec)


@pytest.fixture
def mmca(monkeypatch):
    """`mmca ARGS...` through the real entry point, with only this subcommand registered (so
    the test does not depend on the other subcommands' imports)."""
    import mmca.cli

    assert "evaluate" in mmca.cli.COMMANDS
    monkeypatch.setattr(mmca.cli, "COMMANDS", ["evaluate"])
    return lambda *argv: mmca.cli.main([str(a) for a in argv])


def test_cli_evaluates_a_checkpoint_and_writes_results(mmca, precomp, checkpoint, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert mmca("evaluate", precomp, "--checkpoint", checkpoint, "--cache", tmp_path / "cache",
                "--device", "cpu", "--full-ranks", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "image->text" in printed and "text->image" in printed and "rsum" in printed
    raw = json.loads(out.read_text())
    assert raw["split"] == "dev" and raw["protocol"] == "full" and raw["mode"] == "exact"
    assert raw["images"] == 6 and raw["captions"] == 30
    assert raw["checkpoint"] == str(checkpoint.resolve())
    assert raw["metrics"]["i2t_meanr"] is not None  # --full-ranks: every rank exact


def test_cli_errors_are_clear(mmca, precomp, checkpoint, tmp_path, capsys):
    assert mmca("evaluate", precomp, "--checkpoint", tmp_path / "missing.pt") == 2
    assert "checkpoint not found" in capsys.readouterr().err

    assert mmca("evaluate", precomp, "--checkpoint", checkpoint, "--protocol", "coco1k") == 2
    assert "6 images, but protocol 'coco1k'" in capsys.readouterr().err

    captions = (precomp / "dev_caps.txt").read_text().splitlines()
    (precomp / "dev_caps.txt").write_text("\n".join(captions[:-1]) + "\n")
    assert mmca("evaluate", precomp, "--checkpoint", checkpoint) == 2
    assert "29 captions" in capsys.readouterr().err


def test_cli_refuses_a_nan_checkpoint_and_writes_no_results(mmca, precomp, checkpoint, tmp_path, capsys):
    from mmca.checkpoint import read_checkpoint

    payload = read_checkpoint(checkpoint)
    payload["model"]["region_fc.bias"][0] = float("nan")
    torch.save(payload, checkpoint)
    assert mmca("evaluate", precomp, "--checkpoint", checkpoint, "--cache", tmp_path / "cache") == 2
    assert "contain NaN" in capsys.readouterr().err
    assert not list(checkpoint.parent.glob("eval-*.json"))


def test_cli_results_record_precision_ties_and_never_collide(mmca, precomp, checkpoint, tmp_path):
    common = ("evaluate", precomp, "--checkpoint", checkpoint, "--cache", tmp_path / "cache",
              "--captions-per-image", "0")  # 0: any count, as in `mmca prepare`
    assert mmca(*common) == 0
    assert mmca(*common, "--ties", "argsort") == 0
    assert mmca(*common, "--precision", "bf16") == 0
    names = sorted(p.name for p in checkpoint.parent.glob("eval-*.json"))
    assert names == ["eval-dev-full-exact-bf16.json", "eval-dev-full-exact-fp32-argsort-ties.json",
                     "eval-dev-full-exact-fp32.json"]
    raw = json.loads((checkpoint.parent / "eval-dev-full-exact-bf16.json").read_text())
    assert raw["precision"] == "bf16" and raw["ties"] == "pessimistic" and raw["device"] == "cpu"
    assert raw["exact_below"] == 10 and raw["mode"] == "exact"


def test_the_split_is_read_once(mmca, precomp, checkpoint, tmp_path, monkeypatch):
    import mmca.data.layouts as layouts

    calls = []
    real = layouts._read_precomp_split
    monkeypatch.setattr(layouts, "_read_precomp_split", lambda *a: calls.append(a) or real(*a))
    assert mmca("evaluate", precomp, "--checkpoint", checkpoint, "--cache", tmp_path / "cache") == 0
    assert len(calls) == 1
