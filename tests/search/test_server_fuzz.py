"""Property-based tests (hypothesis) of every server endpoint: whatever the body, query or
upload, the answer is a 4xx JSON error or a valid result, never a 500. Fixed example counts."""

from __future__ import annotations

import io
import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)

json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(text, inner, max_size=3)), max_leaves=8)
bodies = st.one_of(
    st.fixed_dictionaries({}, optional={"query": st.one_of(text, json_values), "k": json_values,
                                        "image": json_values}),
    json_values,
    st.binary(max_size=64),
)


@pytest.fixture(scope="module")
def client(searcher):
    from fastapi.testclient import TestClient

    from mmca.search.server import create_app

    return TestClient(create_app(searcher), base_url="http://127.0.0.1:8000", raise_server_exceptions=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["/api/search", "/api/heatmap", "/api/search_gallery"]), bodies,
       st.sampled_from(["application/json", "text/plain", "application/json; charset=utf-8"]))
def test_json_endpoints_never_fail_with_a_500(client, path, body, content_type):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=raw, headers={"content-type": content_type})
    assert r.status_code < 500, (path, raw[:80], r.text)
    assert isinstance(r.json(), dict)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=30), st.text(max_size=30), st.text(max_size=20))
def test_get_endpoints_never_fail_with_a_500(client, offset, limit, image_id):
    r = client.get("/api/gallery", params={"offset": offset, "limit": limit})
    assert r.status_code < 500, r.text
    r = client.get(f"/api/image/{quote(image_id, safe='')}")
    assert r.status_code < 500, r.text


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200), st.sampled_from(["PNG", "JPEG", "GIF", None]), st.integers(1, 40),
       st.text(max_size=5))
def test_uploads_never_fail_with_a_500(client, junk, fmt, side, k):
    if fmt is None:
        data = junk
    else:
        buf = io.BytesIO()
        Image.new("RGB", (side, side)).save(buf, fmt)
        data = buf.getvalue()[: len(buf.getvalue()) - len(junk) % 7]  # sometimes truncated
    r = client.post("/api/search_image", files={"file": ("x", data, "application/octet-stream")}, data={"k": k})
    assert r.status_code < 500, r.text
