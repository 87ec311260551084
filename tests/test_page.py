"""The browser side of the service in headless Chromium (Debian's /usr/bin/chromium, driven by playwright) against
the session's real server: the page at / (labels offered, unknown names flagged, examples, overlay drawn with fixed
colours, opacity and outlines, hover, messages, layout at desktop and phone width, judged on screenshots) and the
API docs at /docs and /redoc rendered with every request off 127.0.0.1 blocked.

Set REFBANK_SCREENSHOT_DIR to keep the screenshots."""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from query.render import hex_colour
from tests.service_fixtures import CHROMIUM, CHROMIUM_ARGS, TOKEN, png, playwright

EXAMPLES = Path(__file__).resolve().parents[1] / "query" / "static" / "examples"


@pytest.fixture(scope="module")
def browser():
    sync_playwright = playwright()
    with sync_playwright() as p:
        running = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield running
        running.close()


@contextmanager
def local_page(browser, server, width: int = 1280, height: int = 900) -> Iterator:
    """A page whose requests to anything but the server (or data: / blob:) are aborted; closed on leaving, and then
    none may have been aborted."""
    page = browser.new_page(viewport={"width": width, "height": height})
    blocked: list[str] = []

    def route(r) -> None:
        if r.request.url.startswith((server.url + "/", "data:", "blob:")):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    try:
        yield page
    finally:
        page.close()
    assert not blocked, blocked


def keep(path: Path) -> None:
    if os.environ.get("REFBANK_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["REFBANK_SCREENSHOT_DIR"]) / path.name)


def shot_colours(page, selector: str, path: Path) -> set[str]:
    """The "#rrggbb" colours of an element's screenshot, its 1 px border cut off."""
    page.locator(selector).screenshot(path=str(path))
    keep(path)
    pixels = np.asarray(Image.open(path).convert("RGB"))[2:-2, 2:-2].reshape(-1, 3)
    return {"#{:02x}{:02x}{:02x}".format(*p) for p in np.unique(pixels, axis=0)}


def log_in(page, server) -> None:
    """Open the page with the token; wait for the bank's description and its labels."""
    page.goto(server.url + "/")
    page.fill("#token", TOKEN)
    page.dispatch_event("#token", "change")
    page.wait_for_selector("#bank >> text=UNTRAINED")
    page.wait_for_selector("#label-list .chip")  # wait_for_function: pass "() => ..." (the CSP forbids eval)


def segment(page, status: str = "done") -> None:
    page.click("#segment")
    page.wait_for_selector(f"#status >> text={status}", timeout=30_000)


def legend_of(page) -> dict[str, str]:
    """label → colour of the legend entries shown (background left out)."""
    items = page.eval_on_selector_all("#legend li", "items => items.map(li => [li.dataset.label, li.dataset.color])")
    return {label: colour for label, colour in items if label}


def no_overflow(page) -> None:
    width = page.evaluate("window.innerWidth")
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    wide = page.evaluate("""w => [...document.querySelectorAll('body *')].filter(e => e.offsetParent !== null &&
        e.getBoundingClientRect().right > w + 0.5).map(e => e.id || e.tagName)""", width)
    assert not wide, wide


def test_docs_and_redoc_work_offline(server, browser):
    spec = json.loads(urllib.request.urlopen(server.url + "/openapi.json", timeout=30).read())
    operations = sum(1 for item in spec["paths"].values() for method in item if method in ("get", "post"))
    assert operations >= 7 and "/v1/labels" in spec["paths"]
    for path in ("/docs", "/redoc", "/"):
        with urllib.request.urlopen(server.url + path, timeout=30) as response:
            html = response.read().decode()
            # The browser may load nothing from elsewhere (ReDoc's bundle would fetch its logo from a CDN).
            assert response.headers["Content-Security-Policy"].startswith("default-src 'self';"), path
        assert not re.findall(r"(?:https?:)?//[^\s'\"<>]+", html), path  # nothing but this server's own paths
        assert path == "/" or "/static/vendor/" in html
    with local_page(browser, server) as page:
        page.goto(server.url + "/docs")
        page.wait_for_function(f"() => document.querySelectorAll('.opblock').length === {operations}", timeout=30_000)
        assert "refbank" in page.text_content(".information-container")
        page.goto(server.url + "/redoc")
        page.wait_for_function("() => document.querySelectorAll(\"[data-section-id*='operation/']\").length > 0",
                               timeout=30_000)
        titles = page.eval_on_selector_all("[data-section-id*='operation/'] h2", "hs => hs.map(h => h.textContent)")
        assert len(titles) == operations, titles


def test_page_at_desktop_width(server, browser, client, tmp_path):
    with local_page(browser, server, 1280) as page:
        log_in(page, server)
        # The bank's labels are listed, suggested while typing, and unknown names flagged before sending.
        bank = {e["label"]: e for e in client.labels()["labels"]}
        chips = page.eval_on_selector_all("#label-list .chip", "cs => cs.map(c => c.dataset.label)")
        assert sorted(chips) == sorted(bank)
        assert page.get_attribute("#classes", "placeholder").removeprefix("e.g. ").split(", ")[0] in bank
        page.fill("#classes", "cat, gr")
        page.wait_for_function("() => document.querySelectorAll('#class-suggestions option').length > 0")
        options = page.eval_on_selector_all("#class-suggestions option", "os => os.map(o => o.value)")
        assert sorted(options) == sorted(f"cat, {n}" for n in bank if n.startswith("gr"))
        page.fill("#classes", "cat, sky")
        assert "not a bank label: sky" in page.text_content("#class-check")
        page.click("#label-list .chip[data-label='moon']")
        assert page.input_value("#classes") == "cat, sky, moon"
        # An example image, with its classes filled in.
        examples = json.loads((EXAMPLES / "examples.json").read_text())
        page.click(f"#examples button[data-file='{examples[0]['file']}']")
        page.wait_for_function("() => document.getElementById('image').files.length === 1")
        assert page.input_value("#classes") == ", ".join(examples[0]["classes"])
        assert page.text_content("#class-check") == ""
        # Segment; the legend lists exactly the labels the server's label map holds.
        segment(page)
        image = (EXAMPLES / examples[0]["file"]).read_bytes()
        truth = client.segment(image, classes=examples[0]["classes"])
        present = {e["label"] for e in truth["legend"] if e["label"] is not None and e["pixels"] > 0}
        first = legend_of(page)
        assert set(first) == present and len(present) >= 2
        assert all(colour == hex_colour(label) for label, colour in first.items())
        # At opacity 1 without outlines the overlay shows exactly the legend's colours (every region labelled).
        page.fill("#opacity", "1")
        page.dispatch_event("#opacity", "input")
        page.uncheck("#outlines")
        assert shot_colours(page, "#view", tmp_path / "page-overlay-1.png") == set(first.values())
        # Outlines on at opacity 0: the image shows through, the label edges keep their colours.
        page.fill("#opacity", "0")
        page.dispatch_event("#opacity", "input")
        page.check("#outlines")
        outlined = shot_colours(page, "#view", tmp_path / "page-outlines.png")
        assert set(first.values()) <= outlined and len(outlined) > 10 * len(first)
        # Hover shows the label and score of the region under the pointer, and marks its legend entry.
        box = page.query_selector("#view").bounding_box()
        x, y = 40, 70  # image pixel
        page.mouse.move(box["x"] + (x + 0.5) * box["width"] / 128, box["y"] + (y + 0.5) * box["height"] / 128)
        region = truth["result"]["regions"][truth["region_map"][y, x]]
        tip = page.text_content("#tip")
        assert tip.startswith(region["label"]) and f"score {region['score']:.3f}" in tip
        assert page.eval_on_selector("#legend li.active", "li => li.dataset.label") == region["label"]
        page.screenshot(path=str(tmp_path / "page-desktop.png"), full_page=True)
        keep(tmp_path / "page-desktop.png")
        assert Image.open(tmp_path / "page-desktop.png").size[0] == 1280
        no_overflow(page)
        form, result = page.query_selector("#form").bounding_box(), page.query_selector("#result").bounding_box()
        assert result["x"] >= form["x"] + form["width"]  # two columns side by side
        # A second request, other classes in another order: the shared labels keep their colours.
        again = list(reversed(examples[0]["classes"]))[:2] + ["galaxy"]
        page.fill("#classes", ", ".join(again))
        page.fill("#opacity", "1")
        page.dispatch_event("#opacity", "input")
        page.uncheck("#outlines")
        segment(page)
        second = legend_of(page)
        shared = set(first) & set(second)
        assert shared and all(first[label] == second[label] for label in shared)
        assert shot_colours(page, "#view", tmp_path / "page-overlay-2.png") == set(second.values())
        # A threshold that drops every region says so instead of "done".
        page.fill("#threshold", "1.5")
        segment(page, "nothing labelled")
        assert "threshold 1.5" in page.text_content("#status") and page.get_attribute("#status", "class") == "warn"
        assert legend_of(page) == {}
        # The server's word on unknown names shows after the answer; stale messages go.
        page.fill("#threshold", "")
        page.fill("#classes", "cat, sky")
        segment(page)
        assert "sky" in page.text_content("#notes")
        page.fill("#classes", "cat, cat")
        page.click("#segment")
        page.wait_for_selector("#status.error")
        assert "unique" in page.text_content("#status")
        assert page.text_content("#notes") == "" and legend_of(page) == {}  # the last result went with it
        page.fill("#classes", "cat, grass")
        page.dispatch_event("#classes", "input")
        assert page.text_content("#status") == ""
        # Reference mode: drag a box on the reference canvas (the target image itself), segment.
        page.set_input_files("#image", files=[{"name": "x.png", "mimeType": "image/png", "buffer": image}])
        page.select_option("#mode", "reference")
        page.wait_for_function("() => document.getElementById('ref-canvas').width > 300")  # 128 px drawn larger
        box = page.query_selector("#ref-canvas").bounding_box()
        page.mouse.move(box["x"] + 0.05 * box["width"], box["y"] + 0.05 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + 0.55 * box["width"], box["y"] + 0.45 * box["height"], steps=4)
        page.mouse.up()
        drawn = [int(v) for v in page.text_content("#box-text").split("(")[0].removeprefix("box ").split(",")]
        assert np.allclose(drawn, [6.4, 6.4, 70.4, 57.6], atol=2), drawn  # image pixels, XYXY
        page.click("#segment")
        page.wait_for_selector("#summary >> text=reference", timeout=30_000)
        assert "target" in page.text_content("#summary")


def test_page_at_phone_width(server, browser, world, tmp_path):
    with local_page(browser, server, 420) as page:
        log_in(page, server)
        no_overflow(page)
        page.set_input_files("#image", files=[{"name": "heldout.png", "mimeType": "image/png",
                                                "buffer": png(world["heldout"][0].image)}])
        page.fill("#classes", "cat, grass, brick, galaxy")
        segment(page)
        no_overflow(page)
        path = tmp_path / "page-phone.png"
        page.screenshot(path=str(path), full_page=True)
        keep(path)
        assert Image.open(path).size[0] == 420  # a full-page screenshot is as wide as the page
        form, result = page.query_selector("#form").bounding_box(), page.query_selector("#result").bounding_box()
        assert result["y"] >= form["y"] + form["height"]  # one column: the result under the form
        view = page.query_selector("#view").bounding_box()
        assert view["x"] >= 0 and view["x"] + view["width"] <= 420 and view["width"] >= 300
        labels = set(legend_of(page))
        assert labels and labels <= {"cat", "grass", "brick", "galaxy"}
