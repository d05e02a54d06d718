"""The server against a hostile page or gallery: files served by id from the gallery roots only,
with the decoded file's content type; local Host names only; no cross-site requests; every
malformed input a 4xx JSON."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from mmca.search import Searcher, add_to_index, build_from_folder
from mmca.search.server import create_app

LOCAL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def hostile(gallery, checkpoint, tmp_path_factory):
    """An index of 3 gallery photos plus a valid PNG named evil.html added by --add."""
    root = tmp_path_factory.mktemp("hostile")
    photos = root / "photos"
    photos.mkdir()
    for p in sorted(gallery.glob("*.jpg"))[:3]:
        shutil.copy(p, photos / p.name)
    index = root / "index"
    build_from_folder(index, checkpoint, photos, progress=False)
    evil = root / "elsewhere" / "evil.html"
    evil.parent.mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(evil, "PNG")
    add_to_index(index, [evil], progress=False)
    return root, index


def client_for(index, **kw) -> TestClient:
    return TestClient(create_app(Searcher(index)), base_url=kw.pop("base_url", LOCAL),
                      raise_server_exceptions=False, **kw)


def test_a_png_named_html_is_served_as_png_with_nosniff(hostile):
    _, index = hostile
    c = client_for(index)
    r = c.get("/api/image/3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in c.get("/").headers["content-security-policy"]


def test_files_outside_the_gallery_are_never_served(hostile, tmp_path):
    root, index = hostile
    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    photo = sorted((root / "photos").glob("*.jpg"))[0]
    # an images.path edited to a file outside every gallery root
    with sqlite3.connect(copy / "index.sqlite") as con:
        con.execute("UPDATE images SET path = '/etc/passwd' WHERE id = 1")
    c = client_for(copy)
    r = c.get("/api/image/1")
    assert r.status_code in (403, 404) and b"root:" not in r.content
    # a gallery file replaced by a symlink out of the gallery
    saved = photo.read_bytes()
    photo.unlink()
    photo.symlink_to("/etc/passwd")
    try:
        r = c.get("/api/image/0")
        assert r.status_code in (403, 404) and b"root:" not in r.content
        assert "error" in r.json()
    finally:
        photo.unlink()
        photo.write_bytes(saved)


def test_foreign_hosts_and_cross_site_requests_are_refused(hostile):
    _, index = hostile
    assert client_for(index, base_url="http://evil.example:8000").get("/api/info").status_code == 421
    c = client_for(index)
    body = json.dumps({"query": "a dog", "k": 3})
    assert c.post("/api/search", content=body, headers={"content-type": "text/plain"}).status_code == 415
    r = c.post("/api/search", content=body, headers={"content-type": "application/json",
                                                      "origin": "http://evil.example"})
    assert r.status_code == 403
    r = c.post("/api/search", content=body, headers={"content-type": "application/json",
                                                      "sec-fetch-site": "cross-site"})
    assert r.status_code == 403
    ok = c.post("/api/search", content=body, headers={"content-type": "application/json", "origin": LOCAL})
    assert ok.status_code == 200


def test_info_shows_no_absolute_paths(hostile):
    root, index = hostile
    info = client_for(index).get("/api/info").json()
    assert str(root) not in json.dumps(info)


@pytest.mark.parametrize("body", [
    '{"query": "\\ud800 dog", "k": 3}',  # a lone surrogate
    "[" * 5000 + "]" * 5000,  # nested deeper than the JSON parser's recursion
    '{"query": 3}', '{"query": "a dog", "k": true}', "null",
])
def test_malformed_json_is_a_4xx(hostile, body):
    _, index = hostile
    c = client_for(index)
    for path in ("/api/search", "/api/heatmap"):
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, body[:30], r.status_code, r.text)
        assert "error" in r.json()


def test_huge_numbers_and_chunked_uploads_are_refused_early(hostile):
    _, index = hostile
    c = client_for(index)
    assert c.get("/api/gallery", params={"offset": "9" * 5000}).status_code == 400

    def chunks():  # no content-length: the size limit must hold while reading
        for _ in range(50):
            yield b"\0" * (1 << 20)

    r = c.post("/api/search_image", content=chunks(),
               headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, "PNG")
    ok = c.post("/api/search_image", files={"file": ("a.png", png.getvalue(), "image/png")}, data={"k": "2"})
    assert ok.status_code == 409 and "caption" in ok.json()["error"]  # read whole; this index has no captions


def test_open_binding_accepts_ip_literals_only(hostile):
    from mmca.search import Searcher

    _, index = hostile
    app = create_app(Searcher(index), host="0.0.0.0")
    ok = TestClient(app, base_url="http://192.168.1.20:8000", raise_server_exceptions=False)
    assert ok.get("/api/info").status_code == 200
    rebinding = TestClient(app, base_url="http://evil.example:8000", raise_server_exceptions=False)
    assert rebinding.get("/api/info").status_code == 421


def test_other_sites_cannot_embed_or_probe_the_gallery(hostile):
    _, index = hostile
    c = client_for(index)
    embed = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors", "sec-fetch-dest": "image"}
    r = c.get("/api/image/0", headers=embed)
    assert r.status_code == 403 and r.headers["cross-origin-resource-policy"] == "same-origin"
    assert c.get("/api/gallery", headers=embed).status_code == 403
    link = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}
    assert c.get("/", headers=link).status_code == 200  # following a link to the page is fine
    for origin in ("http://[", "http://127.0.0.1:9999", "https://127.0.0.1:8000", "null"):
        r = c.post("/api/search", content=b'{"query": "a dog"}',
                   headers={"content-type": "application/json", "origin": origin})
        assert r.status_code == 403, origin


def test_crafted_checkpoints_cannot_exhaust_memory(tmp_path):
    from mmca.checkpoint import FORMAT, load_model
    from mmca.errors import CheckpointError

    path = tmp_path / "huge.pt"
    torch.save({"format": FORMAT, "config": {"d": 65536, "heads": 1, "img_dim": 65536}, "model": {}}, path)
    with pytest.raises(CheckpointError, match="do not match its config"):
        load_model(path)  # built on the meta device: nothing allocated


def test_file_names_that_are_not_text_are_refused_before_any_work(tmp_path):
    from mmca.errors import DataError
    from mmca.features.images import list_images

    name = b"\xff.jpg".decode("utf-8", "surrogateescape")
    Image.new("RGB", (20, 20)).save(tmp_path / name, "JPEG")
    with pytest.raises(DataError, match="not valid UTF-8"):
        list_images(tmp_path)
