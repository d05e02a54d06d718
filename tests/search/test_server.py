"""The server's API through FastAPI's TestClient: results, images by id, every bad input."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mmca.search.server import create_app


@pytest.fixture(scope="module")
def client(searcher):
    return TestClient(create_app(searcher), base_url="http://127.0.0.1:8000", raise_server_exceptions=False)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (invalid) body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_bytes(w: int, h: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 80, 40)).save(buf, fmt)
    return buf.getvalue()


def upload(name: str, data: bytes, kind: str) -> dict[str, tuple[str, bytes, str]]:
    """The multipart `files` of one uploaded file."""
    return {"file": (name, data, kind)}


def assert_error(resp, status: int, text: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert text in body["error"], body


def test_page_and_info(client):
    r = client.get("/")
    assert r.status_code == 200 and 'id="query"' in r.text
    assert client.get("/static/app.js").status_code == 200
    info = client.get("/api/info").json()
    assert info["images"] == 20 and info["captions"] == 100


def test_search_heatmap_and_images(client, searcher):
    r = client.post("/api/search", json={"query": "a dog runs on the beach", "k": 5})
    assert r.status_code == 200
    out = r.json()
    assert len(out["results"]) == 5 and out["ms"] > 0
    scores = [x["score"] for x in out["results"]]
    assert scores == sorted(scores, reverse=True)
    top = out["results"][0]["id"]
    img = client.get(f"/api/image/{top}")
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    assert img.content == searcher.image_path(top).read_bytes()
    h = client.post("/api/heatmap", json={"query": "a dog runs on the beach", "image": top}).json()
    assert h["grid"] == 6 and len(h["weights"]) == len(h["tokens"]) and len(h["weights"][0]) == 36
    g = client.post("/api/search_gallery", json={"image": top, "k": 3}).json()
    assert len(g["results"]) == 3 and all(x["text"] for x in g["results"])
    up = client.post("/api/search_image", files={"file": ("p.jpg", img.content, "image/jpeg")}, data={"k": "4"})
    assert up.status_code == 200 and len(up.json()["results"]) == 4
    assert client.get("/api/gallery?offset=0&limit=5").json()["items"][0]["id"] == 0


def test_bad_inputs_are_4xx_json_and_the_server_keeps_serving(client):
    as_json = {"content-type": "application/json"}
    cases = [
        (client.post("/api/search", json={"query": "", "k": 5}), 400, "empty"),
        (client.post("/api/search", json={"query": "   ", "k": 5}), 400, "empty"),
        (client.post("/api/search", json={"query": "x" * 10000}), 413, "at most 1000"),
        (client.post("/api/search", json={"query": 42}), 400, "must be a string"),
        (client.post("/api/search", json={"query": "dog", "k": 0}), 400, "k must be"),
        (client.post("/api/search", json={"query": "dog", "k": "5"}), 400, "k must be"),
        (client.post("/api/search", content=b"{not json", headers=as_json), 400, "not valid JSON"),
        (client.post("/api/search", content=b"x" * 100_000, headers=as_json), 413, "larger than"),
        (client.post("/api/search", json=["dog"]), 400, "JSON object"),
        (client.post("/api/heatmap", json={"query": "dog", "image": 999}), 404, "no image"),
        (client.post("/api/heatmap", json={"query": "dog", "image": "../../etc/passwd"}), 404, "no image"),
        (client.post("/api/search_gallery", json={"image": -1}), 404, "no image"),
        (client.post("/api/search_image", files=upload("a.txt", b"hello, not an image", "text/plain")), 415,
         "not an image"),
        (client.post("/api/search_image", files=upload("a.png", image_bytes(1, 1), "image/png")), 400, "1x1"),
        (client.post("/api/search_image", files=upload("big.png", png_header_only(20000, 20000), "image/png")), 413,
         "too large"),
        (client.post("/api/search_image", files=upload("a.jpg", image_bytes(300, 200, "JPEG")[:200], "image/jpeg")),
         415, ""),
        (client.post("/api/search_image", files=upload("e.png", b"", "image/png")), 400, "empty"),
        (client.post("/api/search_image", data={"k": "3"}), 415, "multipart"),
        (client.post("/api/search_image", files={"other": ("a.png", b"x", "image/png")}), 400, "no file"),
        (client.post("/api/search_image", content=b"raw", headers={"content-type": "image/png"}), 415, "multipart"),
        (client.post("/api/search_image", files=upload("a.png", image_bytes(64, 64), "image/png"), data={"k": "x"}),
         400, "k must be"),
        (client.get("/api/image/999"), 404, "no image"),
        (client.get("/api/image/-1"), 404, "no image"),
        (client.get("/api/image/..%2F..%2Fetc%2Fpasswd"), 404, ""),
        (client.get("/api/image/%2e%2e"), 404, ""),
        (client.get("/static/..%2F..%2Fquery.py"), 404, ""),
        (client.get("/api/gallery?limit=100000"), 400, "limit"),
        (client.get("/no/such/page"), 404, ""),
    ]
    for resp, status, text in cases:
        assert_error(resp, status, text)
    # still serving
    assert client.post("/api/search", json={"query": "a dog", "k": 2}).status_code == 200


def test_raw_path_traversal_against_the_real_server(index_dir):
    """httpx normalises `..` away, so send the raw request line over a socket to uvicorn."""
    import socket
    import threading
    import time

    import uvicorn

    from mmca.search import Searcher

    app = create_app(Searcher(index_dir))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        for path in ("/api/image/../../etc/passwd", "/../../etc/passwd", "/static/../../../etc/passwd"):
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := c.recv(65536):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.split()[1] in (b"400", b"404"), head
            assert b"root:" not in body
    finally:
        server.should_exit = True
        thread.join(10)


def test_warm_up_runs_every_kind_of_query_before_the_first_user(index_dir):
    from mmca.search import Searcher

    searcher = Searcher(index_dir)
    assert searcher._backbone is None
    passes = searcher.engine.pair_passes
    assert searcher.warm_up() > 0
    assert searcher._backbone is not None and searcher.engine.pair_passes > passes  # backbone loaded, engine run
    hm = searcher.heatmap("a dog", 0)
    assert hm["name"] == searcher.index.image_names[0] and len(hm["captions"]) == 5
