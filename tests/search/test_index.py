"""The index: storage, identity checks, appends, atomicity; exact queries against exhaustive."""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest
import torch

from mmca.cli import main
from mmca.engine import ImageBank
from mmca.engine.heatmap import cross_token_region_attention
from mmca.errors import CheckpointError, DataError
from mmca.features import FeatureRequest
from mmca.search import GalleryIndex, Searcher, add_to_index, build_from_folder
from mmca.search.index import IMAGE_FIELDS, IndexWriter
from mmca.search.query import merge_topk

N_IMAGES = 20  # as in conftest.py

QUERIES = ["a dog runs on the beach", "two children playing in the water", "a man riding a bike"]


def test_index_layout(index_dir, checkpoint):
    idx = GalleryIndex(index_dir)
    assert idx.num_images == N_IMAGES and len(idx.captions) == 5 * N_IMAGES
    assert sorted(np.unique(idx.caption_image).tolist()) == list(range(N_IMAGES))
    with sqlite3.connect(index_dir / "index.sqlite") as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
    assert {"meta", "shards", "images", "captions"} <= tables
    assert meta["checkpoint"]["sha256"] == idx.check_checkpoint(checkpoint)["sha256"]
    spec = idx.spec  # with the checkpoint's identity, what identifies the index
    assert spec.image.grid == 6 and spec.text.dim == 384 and meta["feature_spec"] == spec.to_dict()
    assert "backbone" not in meta and "text_encoder" not in meta
    shard = idx.image_shards[0].arrays
    assert set(shard) == set(IMAGE_FIELDS)
    assert shard["r"].dtype == np.float16 and shard["i0"].dtype == np.float32
    assert shard["r"].shape == (N_IMAGES, 36, 64) and isinstance(shard["r"], np.memmap)


@pytest.mark.parametrize("resident", [True, False])
def test_text_search_is_exact(index_dir, resident):
    s = Searcher(index_dir, resident=resident)
    bank = ImageBank(**s.index.all_images())
    for q in QUERIES:
        for k in (1, 5, N_IMAGES):
            got, _ = s.search_text(q, k)
            _, _, tb = s._encode(q)
            want_s, want_i = s.engine.topk_images(bank, tb, k, mode="exhaustive")
            assert [r["id"] for r in got] == want_i[0].tolist()
            assert np.allclose([r["score"] for r in got], want_s[0].numpy(), rtol=0, atol=1e-6)


def test_gathered_prefix_matches_resident_on_many_queries(index_dir):
    a, b = Searcher(index_dir, resident=True), Searcher(index_dir, resident=False)
    for q in ["dog", "girl", "people in a street", "a black and white dog jumps over a log", "red"]:
        ra, _ = a.search_text(q, 3)
        rb, _ = b.search_text(q, 3)
        assert [r["id"] for r in ra] == [r["id"] for r in rb]


def test_gathered_walk_scores_each_candidate_once(index_dir):
    """Small chunks force a multi-chunk walk: same top-k as resident, no pair scored twice."""
    a, b = Searcher(index_dir, resident=True), Searcher(index_dir, resident=False)
    b.first_chunk = 1
    for q in QUERIES + ["dog", "red"]:
        for k in (1, 2, 5):
            ra, _ = a.search_text(q, k)
            rb, stats = b.search_text(q, k)
            assert [r["id"] for r in ra] == [r["id"] for r in rb]
            assert [r["score"] for r in ra] == [r["score"] for r in rb]
            assert stats.pair_passes <= stats.candidates


def test_merge_topk_breaks_ties_by_lower_id():
    s, i = merge_topk(torch.tensor([0.5, 0.3]), torch.tensor([7, 2]),
                      torch.tensor([0.5, 0.9, 0.3]), torch.tensor([3, 9, 1]), 4)
    assert i.tolist() == [9, 3, 7, 1] and s.tolist() == pytest.approx([0.9, 0.5, 0.5, 0.3])


def test_scores_match_the_model_forward(searcher):
    """The index's stored bank (fp16) scores like the plain model on the same parts."""
    q = QUERIES[0]
    res, _ = searcher.search_text(q, 3)
    ids, tokens, _ = searcher._encode(q)
    states, mask = tokens.batch([0])
    model = searcher.model
    for r in res:
        row = searcher.index.image_rows([r["id"]], ("r", "i0"))
        with torch.no_grad():
            e, c0 = model.encode_text(states, mask)
            i1, c1 = model.cross(row["r"], e, mask)
        full = float((row["i0"] * c0).sum() + model.alpha * (i1 * c1).sum())
        assert abs(full - r["score"]) < 2e-3


def test_image_search_is_exact(searcher, gallery):
    res, _ = searcher.search_gallery_image(4, 7)
    bank = ImageBank(**searcher.index.image_rows([4]))
    want_s, want_i = searcher.engine.topk_captions(bank, searcher.caption_bank, 7, mode="exhaustive")
    assert [r["id"] for r in res] == want_i[0].tolist()
    photo = sorted(gallery.glob("*.jpg"))[4]
    res2, _ = searcher.search_image_file(photo, 7)
    assert len(res2) == 7 and all(r["text"] for r in res2)


def test_heatmap_weights_are_the_cross_units(searcher):
    out = searcher.heatmap("a dog runs", 2)
    assert out["tokens"] == ["[CLS]", "a", "dog", "runs", "[SEP]"] and out["grid"] == 6
    w = np.asarray(out["weights"])
    assert w.shape == (5, 36) and (w >= 0).all() and (w.sum(1) < 1).all()
    # oracle: the attention probabilities of the unit's own forward pass (captured q, k)
    model = searcher.model
    ids, tokens, _ = searcher._encode("a dog runs")
    states, mask = tokens.batch([0])
    r = searcher.index.image_rows([2], ("r",))["r"]
    captured = {}
    import mmca.model.transformer as tr
    orig = tr.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~attn_mask, float("-inf"))
        captured["p"] = scores.softmax(-1)
        return orig(q, k, v, attn_mask=attn_mask, **kw)

    tr.F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model.cross(r, model.token_fc(states), mask)
    finally:
        tr.F.scaled_dot_product_attention = orig
    want = captured["p"][0, :, 36:, :36].mean(0).numpy()
    assert np.allclose(w, want, atol=1e-5)
    with torch.no_grad():
        assert np.allclose(cross_token_region_attention(model, r, states, mask)[0].numpy(), want, atol=1e-5)


def test_mismatched_checkpoint_is_refused(index_dir, other_checkpoint):
    with pytest.raises(CheckpointError, match="was built with checkpoint"):
        Searcher(index_dir, other_checkpoint)


def test_missing_or_foreign_index(tmp_path):
    with pytest.raises(DataError, match="index not found"):
        GalleryIndex(tmp_path / "nope")
    with pytest.raises(DataError, match="not an mmca index"):
        GalleryIndex(tmp_path)


def test_add_appends_without_rebuilding(index_dir, gallery, flickr8k, checkpoint, tmp_path):
    idx_dir = tmp_path / "idx"
    shutil.copytree(index_dir, idx_dir)
    first = idx_dir / "shards" / "img-000000" / "r.npy"
    before = (first.stat().st_ino, first.stat().st_mtime_ns, first.read_bytes())
    extra = tmp_path / "extra"
    extra.mkdir()
    names = (flickr8k / "splits" / "dev.txt").read_text().split()[N_IMAGES:N_IMAGES + 3]
    for n in names:
        shutil.copy(flickr8k / "images" / n, extra / n)
    caps = tmp_path / "caps.txt"
    caps.write_text(f"{names[0]}\tA new caption of the first added photo .\nA caption of no image .\n"
                    f"{names[1]}\t\u200b\u200d\u2060\n\ufeff\u00ad \u200b\n")  # wordless lines: left out
    with pytest.warns(UserWarning, match=r"2 caption\(s\) hold no words"):
        n_img, n_cap = add_to_index(idx_dir, [extra], captions=caps, progress=False)
    assert (n_img, n_cap) == (3, 2)
    assert (first.stat().st_ino, first.stat().st_mtime_ns, first.read_bytes()) == before
    idx = GalleryIndex(idx_dir)
    assert idx.num_images == N_IMAGES + 3 and sorted(idx.image_names[-3:]) == sorted(names)
    assert idx.caption_image[-2:].tolist() == [idx.image_names.index(names[0]), -1]
    s = Searcher(idx_dir)
    res, _ = s.search_text("dog", N_IMAGES + 3)
    assert sorted(r["id"] for r in res) == list(range(N_IMAGES + 3))
    # adding the same files again adds nothing
    assert add_to_index(idx_dir, [extra], progress=False) == (0, 0)


def test_interrupted_build_leaves_nothing(gallery, checkpoint, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(IndexWriter, "add_captions", boom)
    out = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        build_from_folder(out, checkpoint, gallery, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_interrupted_add_keeps_the_index(index_dir, gallery, tmp_path, monkeypatch):
    idx_dir = tmp_path / "idx"
    shutil.copytree(index_dir, idx_dir)
    one = sorted(gallery.glob("*.jpg"))[0]
    photo = tmp_path / "new.jpg"
    shutil.copy(one, photo)
    orig = IndexWriter.commit

    def crash(self):  # killed after the shard is written, before the transaction commits
        self.con.close()  # a dead process holds no lock
        raise KeyboardInterrupt

    monkeypatch.setattr(IndexWriter, "commit", crash)
    with pytest.raises(KeyboardInterrupt):
        add_to_index(idx_dir, [photo], progress=False)
    # like a killed process: the shard was written but never registered, so it is not trusted
    assert (idx_dir / "shards" / "img-000002").exists()
    assert GalleryIndex(idx_dir).num_images == N_IMAGES
    assert Searcher(idx_dir).search_text("dog", 100)[0].__len__() == N_IMAGES
    monkeypatch.setattr(IndexWriter, "commit", orig)
    assert add_to_index(idx_dir, [photo], progress=False) == (1, 0)  # sweeps the orphan, then adds
    assert GalleryIndex(idx_dir).num_images == N_IMAGES + 1


def test_cli_index_and_search(gallery, checkpoint, other_checkpoint, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", "--checkpoint", str(checkpoint), "--out", str(out), "--images", str(gallery)]) == 0
    assert main(["search", "a dog runs on the beach", "--index", str(out), "-k", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert data["kind"] == "images" and len(data["results"]) == 3 and data["results"][0]["path"]
    photo = sorted(gallery.glob("*.jpg"))[0]
    assert main(["search", "--image", str(photo), "--index", str(out), "-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "captions" and len(data["results"]) == 2
    # errors: each a clear message and exit status 2
    cases = [
        (["search", "", "--index", str(out)], "the query is empty"),
        (["search", "x" * 10000, "--index", str(out)], "at most 1000"),
        (["search", "dog", "--index", str(tmp_path / "missing")], "index not found"),
        (["search", "dog", "--index", str(out), "--checkpoint", str(other_checkpoint)], "was built with checkpoint"),
        (["search", "--image", str(gallery / "captions.tsv"), "--index", str(out)], "not an image"),
        (["index", "--checkpoint", str(checkpoint), "--out", str(out), "--images", str(gallery)], "already exists"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err


def test_an_index_of_another_backbone_searches_with_it(gallery, lite_checkpoint, tmp_path):
    """A model trained on EfficientNet-Lite2 features at 260 px: its index records that backbone
    and size, and a photo query goes through that very backbone (the query's regions equal the
    gallery's own for the same photo)."""
    ckpt = lite_checkpoint
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(gallery.glob("*.jpg"))[:3]:
        shutil.copy(p, photos / p.name)
    lines = tmp_path / "captions.txt"
    lines.write_text("a dog runs on the grass\ntwo children play in the water\na man rides a bike\n")
    idx = build_from_folder(tmp_path / "index", ckpt, photos, lines, progress=False)
    recorded = idx.spec.image
    assert (recorded.source, recorded.image_size, recorded.grid) == ("efficientnet_lite2", 260, 6)
    searcher = Searcher(tmp_path / "index")
    assert searcher.backbone.name == "efficientnet_lite2" and searcher.backbone.image_size == 260
    first = sorted(photos.glob("*.jpg"))[0]
    hits, _ = searcher.search_image_bytes(first.read_bytes(), k=3)
    assert len(hits) == 3  # the three captions, scored with the photo's 260 px EfficientNet regions
    with pytest.raises(CheckpointError, match="--backbone mobilenet_v2"):
        build_from_folder(tmp_path / "index2", ckpt, photos, progress=False,
                          features=FeatureRequest(backbone="mobilenet_v2"))


def test_an_index_is_read_by_its_spec_and_one_without_a_spec_is_refused(index_dir, tmp_path):
    """Indexes written with loose backbone/text-encoder entries beside the spec still open (the
    entries are ignored); an index that records no spec is refused, naming the fix."""
    old = tmp_path / "old"
    shutil.copytree(index_dir, old)
    with sqlite3.connect(old / "index.sqlite") as con:
        con.execute("INSERT INTO meta (key, value) VALUES ('backbone', ?), ('text_encoder', ?)",
                    (json.dumps({"name": "something else"}), json.dumps({"dim": 1})))
    assert Searcher(old).search_text("a dog", 3)[0]
    with sqlite3.connect(old / "index.sqlite") as con:
        con.execute("DELETE FROM meta WHERE key = 'feature_spec'")
    with pytest.raises(CheckpointError, match="records no feature spec"):
        Searcher(old)
