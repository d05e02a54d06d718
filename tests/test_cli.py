"""The command line as a careless or hostile user meets it: every mistake is one clear line
(exit 2), an unexpected error is one line plus a --debug pointer (exit 1), never a traceback."""

import pytest
import torch

from mmca.cli import main
from mmca.errors import CheckpointError


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_an_unexpected_error_is_one_line_and_debug_shows_it(capsys, monkeypatch):
    import mmca.cli.prepare as prepare

    def boom(args):
        raise RuntimeError("something broke")

    monkeypatch.setattr(prepare, "run", boom)
    code, err = run(capsys, "prepare", "anywhere")
    assert code == 1 and "unexpected error: RuntimeError: something broke" in err and "--debug" in err
    assert "Traceback" not in err
    with pytest.raises(RuntimeError):
        main(["--debug", "prepare", "anywhere"])


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "epochs=0 must be at least 1"),
    (["--batch-size", "1"], "batch_size=1 must be at least 2"),
    (["--lr", "-1"], "lr=-1.0 must be"),
    (["--d", "250", "--heads", "16"], "d=250 must be divisible by heads=16"),
    (["--alpha", "-0.2"], "alpha=-0.2 must be"),
])
def test_train_refuses_bad_options_before_any_work(capsys, tmp_path, flags, message):
    code, err = run(capsys, "train", tmp_path / "no-such-dataset", "--out", tmp_path / "run", *flags)
    assert code == 2 and message in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "sample", "evaluate"])
@pytest.mark.parametrize("device, message", [("banana", "'banana' is not a device PyTorch knows"),
                                             ("cuda:7", "cuda:7")])
def test_a_device_this_machine_lacks_is_refused_before_any_work(capsys, tmp_path, checkpoint, command, device,
                                                               message):
    args = {"train": [tmp_path / "data", "--out", tmp_path / "run"],
            "sample": [tmp_path / "data", "--out", tmp_path / "run"],
            "evaluate": [tmp_path / "data", "--checkpoint", checkpoint]}[command]  # checked before the dataset
    code, err = run(capsys, command, *args, "--device", device)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_train_refuses_an_out_that_is_a_file(capsys, tmp_path):
    (tmp_path / "taken").write_text("x")
    code, err = run(capsys, "train", tmp_path / "data", "--out", tmp_path / "taken")
    assert code == 2 and "is a file, not a run folder" in err


def test_index_limit_must_be_positive(capsys, tmp_path):
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as exit_:
            main(["index", "--checkpoint", "c.pt", "--out", str(tmp_path), "--dataset", ".", "--limit", bad])
        assert exit_.value.code == 2
    assert "--limit" in capsys.readouterr().err


def test_checkpoint_messages_say_what_is_wrong_and_never_advise_an_unsafe_load(tmp_path):
    from mmca.checkpoint import read_checkpoint

    with pytest.raises(CheckpointError, match="is a directory"):
        read_checkpoint(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "mmca-checkpoint-v1", "x": Exception("a pickled object")}, evil)  # not plain data
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(evil)
    assert "weights_only" not in str(err.value) and "refused" in str(err.value)


def test_crafted_checkpoints_are_refused_cleanly(tmp_path):
    from mmca.checkpoint import FORMAT, load_model

    for payload in ({"format": FORMAT}, {"format": FORMAT, "config": {"heads": 0}, "model": {}},
                    {"format": FORMAT, "config": {}, "model": {"region_fc.weight": torch.zeros(3)}}):
        path = tmp_path / "crafted.pt"
        torch.save(payload, path)
        with pytest.raises(CheckpointError, match="not a usable mmca checkpoint"):
            load_model(path)


def test_search_refuses_text_that_is_not_unicode():
    from mmca.search.query import QueryError, check_text

    with pytest.raises(QueryError, match="not valid Unicode"):
        check_text("\udcff dog")  # an undecodable argv byte, or a lone surrogate from JSON
    assert check_text("  a dog  ") == "a dog"


def test_index_captions_bom_latin1_and_unknown_names(tmp_path):
    from mmca.errors import DataError
    from mmca.search.build import _read_captions

    tsv = tmp_path / "c.tsv"
    tsv.write_bytes("\ufeffa.jpg\ta dog\nb.jpg\ta cat\nzzz.jpg\tnobody\n".encode("utf-8"))
    with pytest.warns(UserWarning, match="1 caption.*not in the gallery"):
        texts, images = _read_captions(tsv, ["a.jpg", "b.jpg"])
    assert texts == ["a dog", "a cat"] and images == [0, 1]  # the BOM did not eat the first line
    tsv.write_bytes("a.jpg\tun caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="(?s)not UTF-8.*iconv"):
        _read_captions(tsv, ["a.jpg"])


def test_images_are_checked_by_content_and_size_everywhere(tmp_path):
    from PIL import Image

    from mmca.errors import DataError
    from mmca.features.backbone import load_image
    from mmca.features.images import require_images

    fake = tmp_path / "photo.jpg"
    fake.write_text("<html><script>alert(1)</script></html>")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    real = tmp_path / "named.html"
    Image.new("RGB", (32, 32)).save(real, "PNG")
    require_images([real])  # a PNG is an image whatever its name
    with pytest.raises(DataError, match="not an image"):
        require_images([real, fake])
    with pytest.raises(DataError, match="1x1 pixels; at least 16x16"):
        require_images([tiny])
    with pytest.raises(DataError, match="1x1 pixels; at least 16x16"):
        load_image(tiny, 352)  # the rule `prepare` applies to dataset photos


def tiny_images_dataset(flickr8k, root, train: int = 10, dev: int = 4):
    """An images-folder dataset of real Flickr8k photos (train from train.txt, dev from dev.txt)."""
    import shutil

    (root / "images").mkdir(parents=True)
    (root / "splits").mkdir()
    names = {}
    for split, n in (("train", train), ("dev", dev)):
        names[split] = (flickr8k / "splits" / f"{split}.txt").read_text().split()[:n]
        (root / "splits" / f"{split}.txt").write_text("\n".join(names[split]) + "\n")
        for name in names[split]:
            shutil.copy(flickr8k / "images" / name, root / "images" / name)
    keep = set(names["train"]) | set(names["dev"])
    lines = [x for x in (flickr8k / "captions.tsv").read_text(encoding="utf-8").splitlines()
             if x.split("\t")[0] in keep]
    (root / "captions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_sample_epochs_must_leave_the_full_model_an_epoch(tmp_path, capsys):
    """--epochs cuts both runs; one that would leave the cross module no epoch is refused
    before any feature is prepared."""
    assert main(["sample", str(tmp_path / "absent"), "--epochs", "4", "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "cross_from_epoch=4 with epochs=4" in err and not (tmp_path / "c").exists()


def test_sample_runs_the_whole_job_and_exports_its_model(flickr8k, tmp_path, capsys):
    """The README's main job end to end on 14 real photos: both runs, the table, the model directory."""
    import json

    import mmca

    root = tmp_path / "data"
    tiny_images_dataset(flickr8k, root)
    out = tmp_path / "runs"
    assert main(["sample", str(root), "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "paper, Flickr30K 1K" in printed and f"model: {out / 'model'}" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["train_seconds"]) == {"α = 0 ablation", "MMCA"}
    card = (out / "model" / "README.md").read_text()
    assert f"mmca sample {root} --preset sample" in card
    r = mmca.load(out / "model", device="cpu")
    hits = r.search("a dog", r.encode_images(root / "images"), k=3)
    assert len(hits) == 3
