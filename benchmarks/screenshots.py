"""Screenshots of the search page for docs/: the real server over an index, driven in headless
Chromium (Playwright), as a person would use it.

    mmca index --checkpoint runs/sample/model --dataset ../shared/data/flickr8k --split dev --out runs/index-dev
    python benchmarks/screenshots.py runs/index-dev docs/images --query "a black dog runs through the snow" --word dog
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path


def serve(index: Path):
    import uvicorn

    from mmca.search import Searcher
    from mmca.search.server import create_app

    searcher = Searcher(index)
    searcher.warm_up()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(searcher), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def main(argv: list[str] | None = None) -> None:
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("index", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--query", default="a black dog runs through the snow")
    p.add_argument("--word", default="dog")
    p.add_argument("--k", type=int, default=12)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    server, url = serve(args.index)
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1100, "height": 1250}, bypass_csp=True)  # waits evaluate JS
            page.goto(url)
            page.locator("#info", has_text="images").wait_for()
            page.fill("#query", args.query)
            page.fill("#k", str(args.k))
            page.click("#search-btn")
            page.wait_for_selector("#results .card img")
            page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
            page.locator("#results .card").first.click()
            page.wait_for_selector("#heatmap-section:not([hidden])")
            page.locator("#words button", has_text=args.word).first.click()
            page.wait_for_function("document.getElementById('heat-img').complete")
            page.screenshot(path=str(args.out / "search-heatmap.jpg"), full_page=True, type="jpeg", quality=82)
            print(f"{args.out / 'search-heatmap.jpg'}: top result {page.inner_text('#heat-score')}, "
                  f"'{args.word}' {page.inner_text('#heat-min')}..{page.inner_text('#heat-max')}")
            page.click("#pick-btn")
            page.wait_for_selector("#gallery .card")
            page.locator("#gallery .card").nth(7).click()
            page.wait_for_selector("#captions li")
            page.screenshot(path=str(args.out / "search-captions.jpg"), full_page=True, type="jpeg", quality=82)
            browser.close()
    finally:
        server.should_exit = True


if __name__ == "__main__":
    main()
