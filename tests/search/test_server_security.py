"""The server against a hostile page or gallery: files served by id from the gallery roots only,
with the decoded file's content type; local Host names only; no cross-site requests; every
malformed input a 4xx JSON."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3

import pytest
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
