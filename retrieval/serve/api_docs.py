"""``/docs``: Swagger UI served from the ``swagger-ui-bundle-v2`` package, so the page works offline.

FastAPI's own ``/docs`` loads Swagger UI from a CDN and stays blank without internet. Here the app is
made with ``docs_url=None`` and this module serves the page and its few asset files itself. Without
the package (or with a Swagger UI older than 5, which cannot read OpenAPI 3.1), ``/docs`` answers a
short page that points at ``/openapi.json``.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from retrieval.serve.errors import ApiError

ASSETS_PATH = "/docs/assets"
# The only files served from the package's folder (its index.html points at an external demo spec).
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
    "swagger-ui-bundle.js.map": "application/json",
    "swagger-ui.css.map": "application/json",
}
NO_DOCS = (
    "<!doctype html><meta charset=utf-8><title>retrieval API</title>"
    "<p>The interactive API docs need the swagger-ui-bundle-v2 package (pip install swagger-ui-bundle-v2)."
    " The API's schema is at <a href={openapi}>{openapi}</a>."
)


def swagger_ui_folder() -> Path | None:
    """The folder of Swagger UI 5+ files shipped by ``swagger-ui-bundle-v2``, or None when it is missing."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    folder = Path(str(swagger_ui_path))
    version = re.fullmatch(r"swagger-ui-(\d+)\..*", folder.name)
    if version is None or int(version.group(1)) < 5 or not (folder / "swagger-ui-bundle.js").is_file():
        return None
    return folder


def add_docs_routes(app: FastAPI, folder: Path | None = None) -> None:
    """``GET /docs`` and ``GET /docs/assets/{name}`` on an app made with ``docs_url=None``."""
    folder = folder if folder is not None else swagger_ui_folder()

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        openapi = f"{root}{app.openapi_url}"
        if folder is None:
            return HTMLResponse(NO_DOCS.format(openapi=openapi))
        return get_swagger_ui_html(
            openapi_url=openapi,
            title=f"{app.title} API",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from the online validator
        )

    @app.get(ASSETS_PATH + "/{name}", include_in_schema=False)
    def docs_asset(name: str) -> Response:
        if folder is None or name not in ASSET_TYPES or not (folder / name).is_file():
            raise ApiError(404, f"no docs asset {name!r}")
        return FileResponse(folder / name, media_type=ASSET_TYPES[name])
