"""The search web server: a static page and a JSON API over one resident `Searcher`.

Every bad input is a 4xx with a JSON body `{"error": ..., "hint": ...}`; the model work runs in
a worker thread so the event loop keeps answering while a query computes.

A server on localhost is reachable from any web page the user visits, so it defends itself:
requests must name a local `Host` (DNS rebinding) and, when a browser says where they come
from (`Origin`, `Sec-Fetch-Site`), come from the page itself; POST bodies must be declared
`application/json` (a cross-site form can only send text/plain, urlencoded or multipart, and
the upload endpoint checks the origin); every response carries `nosniff` and a strict
Content-Security-Policy; images are served by id only, from the gallery roots, with the
content type of the decoded file.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmca.errors import MmcaError
from mmca.search.query import MAX_UPLOAD_BYTES, QueryError, Searcher

MAX_JSON_BYTES = 64 * 1024
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Resource-Policy": "same-origin",  # no <img src> of the user's photos on other sites
    "Cross-Origin-Opener-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _host_name(value: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1' (lower case)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else ""
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _error(status: int, message: str, hint: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "hint": hint}, status_code=status, headers=headers)


def _static(name: str) -> bytes:
    return resources.files("mmca.search").joinpath("static", name).read_bytes()


async def _json_body(request: Request) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and (not _is_number(length, 12) or int(length) > MAX_JSON_BYTES):
        raise QueryError(f"the request body is larger than {MAX_JSON_BYTES} bytes", status=413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise QueryError(f"the request body is larger than {MAX_JSON_BYTES} bytes", status=413)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise QueryError("the request body must be sent as application/json", status=415)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise QueryError("the request body is not valid JSON (or nests too deeply)",
                         'send e.g. {"query": "a dog", "k": 10}') from err
    if not isinstance(data, dict):
        raise QueryError("the request body must be a JSON object")
    return data


def _is_number(text: str, digits: int) -> bool:
    """ASCII digits only (str.isdigit also accepts '²' and other digits int() refuses), at most `digits`."""
    return 0 < len(text) <= digits and text.isascii() and text.isdigit()


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another origin (Fetch Metadata; the
    Origin header, compared whole: scheme, host and port). A top-level navigation to the page
    is allowed from anywhere (following a link), nothing else."""
    site = request.headers.get("sec-fetch-site")
    if site not in (None, "same-origin", "none"):
        return request.method == "GET" and request.url.path == "/" and \
            request.headers.get("sec-fetch-mode") == "navigate"
    origin = request.headers.get("origin")
    if origin is None:
        return True  # no Origin: not a browser's cross-origin request (curl, the tests, a plain GET)
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    host = request.headers.get("host", "")
    want = urlsplit(f"http://{host}")
    return parts.scheme == "http" and parts.hostname == want.hostname and (port or 80) == (want.port or 80)


def _bounded(request: Request, limit: int) -> Request:
    """The request with a body that stops being read past `limit` bytes (chunked or not)."""
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        if message.get("type") == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise QueryError(f"the upload is larger than {MAX_UPLOAD_BYTES} bytes", status=413)
        return message

    return Request(request.scope, receive)


def _stats(stats) -> dict[str, Any]:
    return {"ms": round(stats.ms, 2), "candidates": stats.candidates, "pair_passes": stats.pair_passes,
            **{k: round(v, 2) for k, v in stats.extra.items()}}


def create_app(searcher: Searcher, host: str = "127.0.0.1") -> FastAPI:
    """`host`: the address the server binds to. On a loopback address only local Host names
    are accepted; bound to another address, that address too; bound to all interfaces (0.0.0.0,
    ::), any IP literal, but never a domain name (DNS rebinding always uses a name)."""
    app = FastAPI(title="mmca search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.searcher = searcher
    open_binding = host in ("0.0.0.0", "::")
    allowed = set(LOCAL_HOSTS) | ({host.lower()} if not open_binding else set())

    def host_ok(name: str) -> bool:
        return name in allowed or (open_binding and _is_ip(name))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        name = _host_name(request.headers.get("host", ""))
        if not host_ok(name):
            response = _error(421, f"this server answers to {', '.join(sorted(allowed))}"
                              f"{' or an IP address' if open_binding else ''} only, not {name!r}",
                              "open the page at http://127.0.0.1:PORT/")
        elif not _same_origin(request):
            response = _error(403, "cross-site requests are refused", "use the page served by mmca itself")
        else:
            response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

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
        return _error(500, f"internal error ({type(err).__name__})", headers=SECURITY_HEADERS)

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
        if length is not None and (not _is_number(length, 12) or int(length) > MAX_UPLOAD_BYTES + 65536):
            raise QueryError(f"the upload is larger than {MAX_UPLOAD_BYTES} bytes", status=413)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise QueryError("send the image as multipart/form-data with a field named 'file'", status=415)
        try:
            form = await _bounded(request, MAX_UPLOAD_BYTES + 65536).form(max_files=1, max_fields=4)
        except QueryError:
            raise
        except Exception as err:  # malformed multipart
            raise QueryError(f"cannot read the upload: {err}") from err
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise QueryError("no file in the upload (field 'file')")
            data = await upload.read(MAX_UPLOAD_BYTES + 1)
            k_raw = form.get("k", "10")
            if not isinstance(k_raw, str) or not _is_number(k_raw.strip(), 3):
                raise QueryError("k must be an integer")
            results, stats = await run_in_threadpool(searcher.search_image_bytes, data, int(k_raw))
        finally:
            await form.close()
        return {"results": results, **_stats(stats)}

    @app.get("/api/gallery")
    async def gallery(offset: str = "0", limit: str = "60"):
        if not (_is_number(offset, 12) and _is_number(limit, 4)) or not 1 <= int(limit) <= 500:
            raise QueryError("offset must be >= 0 and limit between 1 and 500")
        a = int(offset)
        b = min(searcher.index.num_images, a + int(limit))
        items = [{"id": i, "name": searcher.index.image_names[i]} for i in range(a, b)
                 if searcher.index.image_paths[i] is not None]
        return {"total": searcher.index.num_images, "offset": a, "items": items}

    @app.get("/api/image/{image_id}")
    async def image(image_id: str):
        if not _is_number(image_id, 12):
            raise QueryError(f"no image {image_id!r} in this gallery (images are served by numeric id)", status=404)
        data, media = await run_in_threadpool(searcher.image_file, int(image_id))
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    return app


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening before anything says "ready": from then on a
    connection is accepted (and answered once the server runs). A port another program holds
    is a clean error naming it, before the model is loaded."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise MmcaError(f"cannot serve on host {host!r}: {err.strerror}",
                        "pass --host 127.0.0.1, or an address of this machine") from err
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT, never one in use
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise _bind_error(host, port, err) from err
    return sock


def _bind_error(host: str, port: int, err: OSError) -> MmcaError:
    if err.errno == errno.EADDRINUSE:
        return MmcaError(f"port {port} on {host} is in use by another program",
                         "stop that program, or pass another --port "
                         f"(e.g. --port {port + 1 if port < 65535 else 8000})")
    if err.errno == errno.EACCES:
        return MmcaError(f"port {port} on {host} needs privileges this user does not have",
                         "pass a --port above 1023")
    return MmcaError(f"cannot listen on {host} port {port}: {err.strerror}",
                     "pass --host 127.0.0.1, or an address of this machine")


def url(sock: socket.socket) -> str:
    """The address a browser opens: the socket's own (an IPv6 literal in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if sock.family == socket.AF_INET6 else f"http://{host}:{port}/"
