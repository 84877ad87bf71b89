"""Our search page (retrieval/serve/page) in headless Chromium against the real app over 24 COCO photos:
a text query, an image upload, a click-through to "more like this" and its shareable URL, the
keyboard, the index picker, API errors and the API key.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import parse_qs, urlparse

import pytest
from browser import chromium, coco_index, post_json, serve_app
from conftest import TEST_DEVICE

pytestmark = pytest.mark.slow
N_PHOTOS = 24
KEY = "test-key-5b1f"


@pytest.fixture(scope="module")
def index_path(tmp_path_factory):
    return coco_index(tmp_path_factory.getbasetemp(), N_PHOTOS)


@pytest.fixture(scope="module")
def server(index_path):
    """The app serving the index twice, as "coco" (the default) and "copy", on 127.0.0.1."""
    from retrieval.serve.app import create_app
    from retrieval.serve.config import ServeConfig

    app = create_app(ServeConfig(indexes=[("coco", index_path), ("copy", index_path)], device=TEST_DEVICE))
    with serve_app(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser):
    """A fresh page; JavaScript errors in it fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(30_000)
    yield page
    context.close()
    assert not errors, errors


def image_ids(page) -> list[int]:
    return [int(i) for i in page.locator("#images .hit").evaluate_all("bs => bs.map(b => b.dataset.id)")]


def wait_for_results(page, count: int = N_PHOTOS) -> None:
    """Until the image grid shows ``count`` results, every thumbnail decoded, and the search has finished."""
    page.wait_for_function(
        """n => { const imgs = [...document.querySelectorAll('#images .hit img')];
                  return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0)
                         && document.querySelector('#panels').getAttribute('aria-busy') === 'false'; }""",
        arg=count,
    )


def api_image_ids(server: str, query: dict, index: str = "coco") -> list[int]:
    answer = post_json(
        f"{server}/api/v1/search",
        {"index": index, "target": "image", "k": N_PHOTOS, "queries": [query], "exclude_self": True},
    )
    return [hit["id"] for hit in answer["results"][0]["hits"]]


def test_a_text_query_shows_the_apis_images(page, server):
    page.goto(server + "/")
    page.fill("#q", "a plate of food on a table")
    page.click("#go")
    wait_for_results(page)
    assert image_ids(page) == api_image_ids(server, {"text": "a plate of food on a table"})
    scores = [float(s) for s in page.locator("#images .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    assert parse_qs(urlparse(page.url).query) == {"q": ["a plate of food on a table"]}
    assert page.locator("#captions-panel").is_hidden()
    assert "results from coco" in page.locator("#status").inner_text()


def test_an_uploaded_photo_finds_itself_first_and_its_captions(page, server, index_path):
    photo = sorted((index_path.parent / "images").glob("*.jpg"))[5]
    page.goto(server + "/")
    page.set_input_files("#file", str(photo))
    wait_for_results(page)
    first = page.locator("#images .hit").first
    assert first.get_attribute("title").endswith(photo.name)
    assert float(first.locator(".score").inner_text()) > 0.99
    captions = page.locator("#captions .hit")
    assert captions.count() > 0 and page.locator("#captions-panel").is_visible()
    assert page.locator("#query-image").is_visible()
    # the captions shown are the API's image -> caption answer for the same file
    data = base64.b64encode(photo.read_bytes()).decode()
    answer = post_json(f"{server}/api/v1/search", {"target": "caption", "k": 24, "queries": [{"image": data}]})
    assert captions.locator(".text").all_inner_texts() == [hit["caption"] for hit in answer["results"][0]["hits"]]
    # a caption searches images with its words
    first_caption = answer["results"][0]["hits"][0]["caption"]
    captions.first.click()
    page.wait_for_url(re.compile(r"[?&]q="))
    wait_for_results(page)
    assert page.input_value("#q") == first_caption and page.locator("#captions-panel").is_hidden()
    assert image_ids(page) == api_image_ids(server, {"text": first_caption})


# how many result tiles share the first tile's row
GRID_COLUMNS = """() => { const b = [...document.querySelectorAll('#images .hit')];
                          const top = b[0]?.getBoundingClientRect().top;
                          return b.filter(x => x.getBoundingClientRect().top === top).length; }"""

DROP_OR_PASTE = """([how, data, name]) => {
    const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
    const files = new DataTransfer();
    files.items.add(new File([bytes], name, {type: 'image/jpeg'}));
    if (how === 'paste') document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: files, bubbles: true}));
    else for (const type of ['dragover', 'drop'])
        window.dispatchEvent(new DragEvent(type, {dataTransfer: files, cancelable: true}));
}"""


@pytest.mark.parametrize("how", ["drop", "paste"])
def test_a_dropped_or_pasted_photo_is_searched(page, server, index_path, how):
    photo = sorted((index_path.parent / "images").glob("*.jpg"))[9]
    page.goto(server + "/")
    page.evaluate(DROP_OR_PASTE, [how, base64.b64encode(photo.read_bytes()).decode(), photo.name])
    wait_for_results(page)
    assert page.locator("#images .hit").first.get_attribute("title").endswith(photo.name)
    assert page.locator("#drop").is_hidden() and page.locator("#query-image").is_visible()


def test_a_click_searches_more_like_it_and_the_url_reproduces_it(page, server):
    page.goto(server + "/?q=two+people+riding+horses")
    wait_for_results(page)
    before = image_ids(page)
    clicked = before[2]
    page.locator("#images .hit").nth(2).click()
    page.wait_for_url(re.compile(rf"[?&]like={clicked}\b"))
    wait_for_results(page, N_PHOTOS - 1)  # exclude_self: the clicked photo is not its own result
    after = image_ids(page)
    assert clicked not in after and after == api_image_ids(server, {"item": {"kind": "image", "id": clicked}})
    assert page.locator("#query-image").is_visible() and page.locator("#captions .hit").count() > 0
    page.reload()
    wait_for_results(page, N_PHOTOS - 1)
    assert image_ids(page) == after
    page.go_back()
    page.wait_for_url(re.compile(r"[?&]q=two"))
    wait_for_results(page)
    assert image_ids(page) == before and page.input_value("#q") == "two people riding horses"


def test_the_keyboard_alone_searches_moves_and_opens(page, server):
    page.goto(server + "/?q=dog")  # start elsewhere than the search box
    wait_for_results(page)
    page.locator("#images .hit").first.focus()
    page.keyboard.press("Escape")  # clears everything
    assert page.locator("#images .hit").count() == 0 and page.input_value("#q") == ""
    assert urlparse(page.url).query == ""
    page.evaluate("document.activeElement.blur()")
    assert page.evaluate("document.activeElement === document.body")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.type("a cat sitting on a couch")
    page.keyboard.press("Enter")
    wait_for_results(page)
    ids = image_ids(page)
    assert parse_qs(urlparse(page.url).query) == {"q": ["a cat sitting on a couch"]}
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.id") == str(ids[1])
    page.keyboard.press("ArrowDown")  # one row down: as many steps as the grid has columns
    columns = page.evaluate(GRID_COLUMNS)
    assert 1 < columns < N_PHOTOS
    assert page.evaluate("document.activeElement.dataset.id") == str(ids[1 + columns])
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(rf"[?&]like={ids[1 + columns]}\b"))
    wait_for_results(page, N_PHOTOS - 1)


def test_the_index_picker_searches_the_chosen_index(page, server):
    page.goto(server + "/?q=a+kitchen")
    wait_for_results(page)
    options = page.locator("#index option").evaluate_all("os => os.map(o => o.value)")
    assert options == ["coco", "copy"] and page.input_value("#index") == "coco"
    with page.expect_request(lambda r: r.url.endswith("/api/v1/search")) as searched:
        page.select_option("#index", "copy")
    assert searched.value.post_data_json["index"] == "copy"
    page.wait_for_url(re.compile(r"[?&]index=copy\b"))
    wait_for_results(page)
    assert "results from copy" in page.locator("#status").inner_text()
    page.reload()
    wait_for_results(page)
    assert page.input_value("#index") == "copy"


def test_an_api_error_is_shown_in_words(page, server):
    page.goto(server + "/?like=999999")
    alert = page.locator("#error")
    alert.wait_for(state="visible")
    assert "999999" in alert.inner_text() and alert.inner_text().startswith("Search failed:")
    assert page.locator("#images .hit").count() == 0


def test_a_phone_sized_window_has_no_sideways_scroll(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(server + "/?q=a+bus+on+a+street")
    wait_for_results(page)
    widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    columns = page.evaluate(GRID_COLUMNS)
    context.close()
    assert widths[0] <= widths[1] and columns >= 3, (widths, columns)


def test_the_page_sends_the_key_from_its_url(browser, index_path):
    from retrieval.serve.app import create_app
    from retrieval.serve.config import ServeConfig

    app = create_app(ServeConfig(indexes=[("coco", index_path)], api_key=KEY, device=TEST_DEVICE))
    with serve_app(app) as url:
        context = browser.new_context()
        page = context.new_page()
        page.goto(url + "/?q=a+dog")
        page.locator("#error").wait_for(state="visible")
        assert "?key=" in page.locator("#error").inner_text()
        page.goto(url + f"/?q=a+dog&key={KEY}")
        wait_for_results(page)  # thumbnails too: fetched with the key, as <img> cannot send it
        page.locator("#images .hit").first.click()
        page.wait_for_url(re.compile(rf"[?&]key={KEY}\b"))
        wait_for_results(page, N_PHOTOS - 1)
        context.close()
