"""`mmca serve`: the search web page and its JSON API on localhost."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmca.cli.features import port_number
from mmca.extras import require_extra

NAME = "serve"
HELP = "serve a web page to search an index by sentence or by image (localhost)"
DESCRIPTION = """\
Serve the search page and its JSON API (FastAPI + uvicorn), bound to 127.0.0.1 by default:
a query box and a grid of result images with scores; a click on a result shows which regions
each word attends to in the cross-attention unit (a heat map over the photo); an image query
(upload, or pick a gallery image) lists the best captions. Images are served only from the
index's gallery, by id. The model and the index stay resident in the server process.

API: GET /api/info, POST /api/search {query, k}, POST /api/heatmap {query, image},
POST /api/search_image (multipart file, k), POST /api/search_gallery {image, k},
GET /api/image/{id}, GET /api/gallery?offset=&limit=
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, required=True, metavar="DIR")
    p.add_argument("--checkpoint", type=Path, help="default: the index's own")
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="default: 8000")


def run(args: argparse.Namespace) -> int:
    require_extra("serve", "mmca serve")
    import uvicorn

    from mmca.search import Searcher
    from mmca.search.server import create_app, listen, url

    sock = listen(args.host, args.port)  # a busy port fails here, before the model is loaded
    with sock:
        searcher = Searcher(args.index, args.checkpoint)
        app = create_app(searcher, host=args.host)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"mmca serve: warning: bound to {args.host}: anyone who can reach this machine can search "
                  "the index and see its photos", flush=True)
        print("mmca serve: warming up (models loaded, one query of each kind)...", flush=True)
        seconds = searcher.warm_up()
        print(f"mmca serve: {searcher.index.num_images} images, {len(searcher.index.captions)} captions; "
              f"ready in {seconds:.1f} s: {url(sock)}", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0
