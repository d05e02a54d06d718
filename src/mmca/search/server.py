"""The search web server: a static page and a JSON API over one resident `Searcher`.

Every bad input is a 4xx with a JSON body `{"error": ..., "hint": ...}`; the model work runs in
a worker thread so the event loop keeps answering while a query computes.
"""

from __future__ import annotations

import json
import mimetypes
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmca.errors import MmcaError
from mmca.search.query import MAX_UPLOAD_BYTES, QueryError, Searcher

MAX_JSON_BYTES = 64 * 1024
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def _error(status: int, message: str, hint: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "hint": hint}, status_code=status)


def _static(name: str) -> bytes:
    return resources.files("mmca.search").joinpath("static", name).read_bytes()


async def _json_body(request: Request) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_JSON_BYTES):
        raise QueryError(f"the request body is larger than {MAX_JSON_BYTES} bytes", status=413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise QueryError(f"the request body is larger than {MAX_JSON_BYTES} bytes", status=413)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise QueryError("the request body is not valid JSON", 'send e.g. {"query": "a dog", "k": 10}') from err
    if not isinstance(data, dict):
        raise QueryError("the request body must be a JSON object")
    return data


def _stats(stats) -> dict[str, Any]:
    return {"ms": round(stats.ms, 2), "candidates": stats.candidates, "pair_passes": stats.pair_passes,
            **{k: round(v, 2) for k, v in stats.extra.items()}}


def create_app(searcher: Searcher) -> FastAPI:
    app = FastAPI(title="mmca search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.searcher = searcher

    @app.exception_handler(QueryError)
    async def _query_error(request: Request, err: QueryError):
        return _error(err.status, err.message, err.hint)

    @app.exception_handler(MmcaError)
    async def _mmca_error(request: Request, err: MmcaError):
        return _error(400, err.message, err.hint)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return _error(422, "invalid request: " + "; ".join(str(e.get("msg")) for e in err.errors()))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):  # a bug, not bad input: still JSON
        return _error(500, f"internal error ({type(err).__name__})")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_static("index.html"), headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC:
            raise QueryError(f"no such file: {name}", status=404)
        return Response(_static(name), media_type=STATIC[name])

    @app.get("/api/info")
    async def info():
        return searcher.info()

    @app.post("/api/search")
    async def search(request: Request):
        data = await _json_body(request)
        results, stats = await run_in_threadpool(searcher.search_text, data.get("query"), data.get("k", 10))
        return {"query": data["query"], "results": results, **_stats(stats)}

    @app.post("/api/heatmap")
    async def heatmap(request: Request):
        data = await _json_body(request)
        return await run_in_threadpool(searcher.heatmap, data.get("query"), data.get("image"))

    @app.post("/api/search_gallery")
    async def search_gallery(request: Request):
        data = await _json_body(request)
        results, stats = await run_in_threadpool(searcher.search_gallery_image, data.get("image"), data.get("k", 10))
        return {"image": data["image"], "results": results, **_stats(stats)}

    @app.post("/api/search_image")
    async def search_image(request: Request):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_UPLOAD_BYTES + 65536):
            raise QueryError(f"the upload is larger than {MAX_UPLOAD_BYTES} bytes", status=413)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise QueryError("send the image as multipart/form-data with a field named 'file'", status=415)
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception as err:  # malformed multipart
            raise QueryError(f"cannot read the upload: {err}") from err
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise QueryError("no file in the upload (field 'file')")
            data = await upload.read(MAX_UPLOAD_BYTES + 1)
            k_raw = form.get("k", "10")
            if not isinstance(k_raw, str) or not k_raw.strip().isdigit():
                raise QueryError("k must be an integer")
            results, stats = await run_in_threadpool(searcher.search_image_bytes, data, int(k_raw))
        finally:
            await form.close()
        return {"results": results, **_stats(stats)}

    @app.get("/api/gallery")
    async def gallery(offset: str = "0", limit: str = "60"):
        if not offset.isdigit() or not limit.isdigit() or not 1 <= int(limit) <= 500:
            raise QueryError("offset must be >= 0 and limit between 1 and 500")
        a = int(offset)
        b = min(searcher.index.num_images, a + int(limit))
        items = [{"id": i, "name": searcher.index.image_names[i]} for i in range(a, b)
                 if searcher.index.image_paths[i] is not None]
        return {"total": searcher.index.num_images, "offset": a, "items": items}

    @app.get("/api/image/{image_id}")
    async def image(image_id: str):
        if not image_id.isdigit() or len(image_id) > 12:
            raise QueryError(f"no image {image_id!r} in this gallery (images are served by numeric id)", status=404)
        path = searcher.image_path(int(image_id))
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "max-age=3600"})

    return app
