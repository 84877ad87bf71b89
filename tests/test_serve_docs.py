"""``/docs`` works offline: Swagger UI comes from the installed swagger-ui-bundle-v2 package, never a CDN;
without the package ``/docs`` points at ``/openapi.json``. Last, the page renders in Chromium with no
failed request.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from retrieval.serve import api_docs
from retrieval.serve.app import create_app
from retrieval.serve.config import ServeConfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
URL_ATTRIBUTES = re.compile(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""")


def make_app(tmp_path: Path):
    """The real app; nothing on these routes reads an index, so none is opened."""
    return create_app(ServeConfig([("docs", tmp_path)], device="cpu"), served=SimpleNamespace())


@pytest.fixture
def client(tmp_path):
    pytest.importorskip("swagger_ui_bundle", reason="swagger-ui-bundle-v2 is not installed")
    with TestClient(make_app(tmp_path)) as test_client:
        yield test_client


def test_docs_reference_only_this_server(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    urls = URL_ATTRIBUTES.findall(page.text)
    assert "/openapi.json" in urls and "/docs/assets/swagger-ui-bundle.js" in urls
    assert all(url.startswith("/") and not url.startswith("//") for url in urls), urls
    assert not re.search(r"https?://", page.text), "the page names an external host"
    for url in urls:
        answer = client.get(url)
        assert answer.status_code == 200 and answer.content, url
    assert client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")


def test_only_the_named_assets_are_served(client):
    assert client.get("/docs/assets/index.html").status_code == 404  # the bundle's demo page names a remote spec
    assert client.get("/docs/assets/..%2Fswagger-ui.js").status_code == 404
    assert client.get("/redoc").status_code == 404  # FastAPI's ReDoc page would load from a CDN
    assert "/docs" not in client.get("/openapi.json").json()["paths"]


def test_without_the_package_docs_point_at_the_schema(tmp_path, monkeypatch):
    monkeypatch.setattr(api_docs, "swagger_ui_folder", lambda: None)
    with TestClient(make_app(tmp_path)) as test_client:
        page = test_client.get("/docs")
        assert page.status_code == 200 and "href=/openapi.json" in page.text and "swagger-ui-bundle-v2" in page.text
        assert test_client.get("/docs/assets/swagger-ui-bundle.js").status_code == 404


def test_a_swagger_ui_older_than_5_counts_as_missing(tmp_path, monkeypatch):
    old = tmp_path / "swagger-ui-4.15.5"
    old.mkdir()
    (old / "swagger-ui-bundle.js").write_text("//")
    monkeypatch.setitem(sys.modules, "swagger_ui_bundle", SimpleNamespace(swagger_ui_path=old))
    assert api_docs.swagger_ui_folder() is None


@pytest.mark.slow
def test_swagger_ui_renders_in_chromium(tmp_path):
    """The page in headless Chromium lists the API's operations, and no request fails or leaves the server."""
    pytest.importorskip("swagger_ui_bundle", reason="swagger-ui-bundle-v2 is not installed")
    from browser import chromium, serve_app

    with serve_app(make_app(tmp_path)) as url, chromium() as browser:
        page = browser.new_page()
        failed: list[str] = []
        errors: list[str] = []

        def note_response(response) -> None:
            if response.status >= 400:
                failed.append(f"{response.status} {response.url}")

        def note_request(request) -> None:
            if not request.url.startswith(url):
                failed.append(f"elsewhere: {request.url}")

        page.on("request", note_request)
        page.on("requestfailed", lambda request: failed.append(f"failed: {request.url}"))
        page.on("response", note_response)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{url}/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert any("/api/v1/search" in path for path in paths), paths
        page.close()
    assert not failed and not errors, (failed, errors)
