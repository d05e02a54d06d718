"""The page in a real browser: Debian's headless Chromium driven by Playwright, against the real
uvicorn server over an index of 20 real Flickr8k photos (random-weight model)."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def server_url(index_dir):
    import uvicorn

    from mmca.search import Searcher
    from mmca.search.server import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(Searcher(index_dir)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def test_page_in_chromium(server_url, gallery):
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/bootstrap.sh installs it when run as root)")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            # the page under its own Content-Security-Policy: it loads, searches, shows images,
            # and the browser reports no violation (waits by selector: CSP forbids eval)
            strict = browser.new_page()
            violations = []
            strict.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
            response = strict.goto(server_url)
            assert "script-src 'self'" in response.headers["content-security-policy"]
            assert response.headers["x-content-type-options"] == "nosniff"
            strict.locator("#info", has_text="20 images").wait_for()
            strict.fill("#query", "a dog runs on the beach")
            strict.click("#search-btn")
            strict.wait_for_selector("#results .card img")
            assert not violations, violations
            strict.close()
            # the rest drives the page with evaluated checks, which need CSP bypassed for the test
            page = browser.new_page(viewport={"width": 1100, "height": 1300}, bypass_csp=True)
            page.goto(server_url)
            page.wait_for_function("document.getElementById('info').textContent.includes('20 images')")
            page.fill("#query", "a dog runs on the beach")
            page.fill("#k", "8")
            page.click("#search-btn")
            page.wait_for_selector("#results .card img")
            assert page.locator("#results .card").count() == 8
            page.wait_for_function(
                "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
            # heat map of the first result
            page.locator("#results .card").first.click()
            page.wait_for_selector("#heatmap-section:not([hidden])")
            page.wait_for_function("document.getElementById('heat-canvas').dataset.drawn === '1'")
            words = page.locator("#words button").all_inner_texts()
            assert "dog" in words and words[0] == "all words"
            page.locator("#words button", has_text="dog").first.click()
            assert page.locator("#words button.active").inner_text() == "dog"
            # what the user reads: the colour bar gives this word's real attention range, the
            # outlined regions are its most attended ones, a flat map says so
            seen = page.evaluate("""() => { const i = heat.tokens.indexOf('dog'); const w = heat.weights[i];
                const order = w.map((v, j) => [v, j]).sort((a, b) => b[0] - a[0] || a[1] - b[1]);
                return {lo: Math.min(...w), hi: Math.max(...w), top: order.slice(0, 3).map(x => x[1]).join(','),
                        captions: heat.captions.length}; }""")
            assert page.inner_text("#heat-max") == f"{100 * seen['hi']:.2f}%"
            assert page.inner_text("#heat-min") == f"{100 * seen['lo']:.2f}%"
            assert page.get_attribute("#heat-canvas", "data-top") == seen["top"]
            assert page.inner_text("#heat-label") == 'attention of "dog" per region'
            flat = (seen["hi"] - seen["lo"]) / seen["hi"] < 0.25
            assert page.locator("#heat-flat").is_visible() == flat
            if flat:
                assert "Nearly uniform" in page.inner_text("#heat-flat")
            # the photo's known captions (5 per Flickr8k photo), and names that stay in their cards
            assert seen["captions"] == 5 and page.locator("#known-captions li").count() == 5
            assert page.evaluate("""() => [...document.querySelectorAll('#results .card')].every(
                c => c.scrollWidth <= c.clientWidth + 1)""")
            # canvas really painted (some non-transparent pixel)
            painted = page.evaluate("""() => { const c = document.getElementById('heat-canvas');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""")
            assert painted > 1000
            page.wait_for_function("document.getElementById('heat-img').complete")
            page.screenshot(path=str(ARTIFACTS / "search-heatmap.png"), full_page=True)
            # image query by upload
            photo = sorted(gallery.glob("*.jpg"))[3]
            page.set_input_files("#upload", str(photo))
            page.click("#upload-btn")
            page.wait_for_selector("#captions li")
            assert page.locator("#captions li").count() == 5
            # ... and by picking from the gallery
            page.click("#pick-btn")
            page.wait_for_selector("#gallery .card")
            page.evaluate("document.getElementById('captions').replaceChildren()")
            page.locator("#gallery .card").nth(5).click()
            page.wait_for_selector("#captions li")
            assert page.locator("#captions li").count() == 5
            # a bad query shows the server's error, and the page keeps working
            page.fill("#query", "x" * 1000 + "y")
            page.evaluate("document.getElementById('query').removeAttribute('maxlength')")
            page.fill("#query", "x" * 1200)
            page.click("#search-btn")
            page.wait_for_selector("#error:not([hidden])")
            assert "at most 1000" in page.inner_text("#error")
            page.screenshot(path=str(ARTIFACTS / "search-captions.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "search-heatmap.png").stat().st_size > 10_000
