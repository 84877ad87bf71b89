"""clip-front, the web page shipped in the clip-retrieval 2.45.0 wheel (top-level ``front/build``), served
as static files and pointed at our server with ``?back=``, in headless Chromium.

It calls /indices-list, then /knn-service (body sent as text/plain) for 3000 result ids with metadata
for the first 40, then /metadata for the next ones as the page is scrolled. 64 photos: more than 40
results, so the page has something left to load while scrolling.
"""

from __future__ import annotations

import json

import pytest
from browser import chromium, clip_front_dir, coco_index, serve_app, serve_folder
from conftest import TEST_DEVICE

pytestmark = pytest.mark.slow
N_PHOTOS = 64
FIRST = 40  # clip-front's numImages: results that arrive with their metadata
ALL_DECODED = """() => [...document.querySelector('clip-front').shadowRoot.querySelectorAll('img.pic')]
                       .every(i => i.complete && i.naturalWidth > 0)"""


@pytest.fixture(scope="module")
def front():
    folder = clip_front_dir()
    with serve_folder(folder) as url:
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from retrieval.serve.app import create_app
    from retrieval.serve.config import ServeConfig

    index = coco_index(tmp_path_factory.getbasetemp(), N_PHOTOS)
    with serve_app(create_app(ServeConfig(indexes=[("coco", index)], device=TEST_DEVICE))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


def test_clip_front_shows_results_and_loads_more_while_scrolling(browser, front, server):
    context = browser.new_context(viewport={"width": 1000, "height": 500})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    metadata: list[list[int]] = []
    page.on(
        "request", lambda r: metadata.append(json.loads(r.post_data)["ids"]) if r.url.endswith("/metadata") else None
    )

    page.goto(f"{front}/?back={server}")
    from playwright.sync_api import (
        expect,  # installed whenever the browser fixture did not skip
    )

    indices = page.locator("clip-front select").first.locator("option")
    expect(indices).to_have_count(1)  # filled from /indices-list, which may answer after the page has drawn
    assert indices.evaluate_all("os => os.map(o => o.value)") == ["coco"]
    page.fill("#searchBar", "a man riding a horse")  # Playwright's CSS reaches into the shadow root
    with page.expect_response(lambda r: r.url.endswith("/knn-service")) as answered:
        page.press("#searchBar", "Enter")
    response = answered.value
    assert response.status == 200 and response.request.post_data_json["text"] == "a man riding a horse"
    results = response.json()
    assert FIRST < len(results) <= N_PHOTOS and len({r["id"] for r in results}) == len(results)
    assert all("image" in r and "caption" in r for r in results[:FIRST]), results[0].keys()
    assert not any("caption" in r for r in results[FIRST:])

    pictures = page.locator("#products img.pic")
    pictures.first.wait_for()
    page.wait_for_function(ALL_DECODED)
    assert pictures.first.get_attribute("title") == results[0]["caption"]

    # the first 40 fill more than the window, so nothing more is loaded until the page is scrolled
    assert page.evaluate("document.documentElement.scrollHeight") > 500
    assert pictures.count() == FIRST and not any(metadata), metadata
    for _ in range(20):  # scroll to the bottom until every result is shown
        if pictures.count() == len(results):
            break
        page.mouse.wheel(0, 5000)
        page.wait_for_timeout(250)
    assert pictures.count() == len(results)
    page.wait_for_function(ALL_DECODED)  # the later results came with their thumbnails too
    asked = [i for ids in metadata for i in ids]
    assert set(asked) == {r["id"] for r in results[FIRST:]}, (asked, len(results))
    context.close()
    assert not errors, errors
