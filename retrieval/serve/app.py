"""The app factory: ``create_app(config)`` -> a FastAPI app serving the configured indexes.

Middleware, outermost first: access log + metrics, CORS, API key, body-size limit. Every error
answers ``{"error": "one-line message"}``; bad input is a 4xx, never a 5xx.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from retrieval.core.version import __version__
from retrieval.serve import api_v1, clip_back
from retrieval.serve.api_docs import add_docs_routes
from retrieval.serve.config import ServeConfig
from retrieval.serve.errors import ApiError
from retrieval.serve.fetch import FetchPolicy
from retrieval.serve.metrics import Metrics
from retrieval.serve.middleware import AccessLog, ApiKey, BodyLimit, Cors
from retrieval.serve.queries import SearchThreads
from retrieval.serve.responses import SafeJSON, error
from retrieval.serve.served import ServedIndexes
from retrieval.serve.thumbnails import ThumbnailCache

log = logging.getLogger("retrieval.serve")
NO_PAGE = (
    "<!doctype html><meta charset=utf-8><title>retrieval</title>"
    "<p>This server answers <a href=/docs>/docs</a>, /api/v1 and the clip-back endpoints; its page is not installed."
)


def add_error_handlers(app: FastAPI) -> None:
    """Every error answers ``{"error": message}``: ApiError and FastAPI's own with their status, a bug with 500."""

    async def handled(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ApiError):
            return error(exc.status, exc.message)
        if isinstance(exc, RequestValidationError):
            first = exc.errors()[0] if exc.errors() else {}
            where = ".".join(str(part) for part in first.get("loc", ()))
            return error(422, f"{where}: {first.get('msg', 'invalid request')}")
        if isinstance(exc, HTTPException):
            return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))
        log.exception("%s %s failed", request.method, request.url.path)  # a bug: still JSON, still CORS
        return error(500, f"internal error ({type(exc).__name__})", {"access-control-allow-origin": "*"})

    for kind in (ApiError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, handled)


def add_plain_routes(app: FastAPI, config: ServeConfig) -> None:
    """``/`` (the page), ``/page/...`` (its files), ``/healthz`` and ``/metrics``."""
    page = config.page_dir

    @app.get("/", include_in_schema=False)
    def index_page() -> Response:
        return FileResponse(page / "index.html") if (page / "index.html").is_file() else HTMLResponse(NO_PAGE)

    if page.is_dir():
        app.mount("/page", StaticFiles(directory=page), name="page")

    @app.get("/healthz")
    def healthz(request: Request) -> Response:
        """Liveness, and the build each index serves (never needs the API key)."""
        return SafeJSON({"status": "ok", "indexes": request.app.state.served.builds()})

    @app.get("/metrics", response_class=Response)
    def metrics(request: Request) -> Response:
        """Prometheus text: requests, latencies and errors by route, index switches."""
        state = request.app.state
        switches = {name: served.switches for name, served in state.served.by_name.items()}
        return Response(state.metrics.render(switches), media_type=state.metrics.content_type)


def create_app(config: ServeConfig, served: ServedIndexes | None = None) -> FastAPI:
    """An app serving ``config.indexes`` (opened now, and warmed when ``config.warm``), or the given ``served``."""
    app = FastAPI(
        title="retrieval",
        version=__version__,
        default_response_class=SafeJSON,
        description="Vision-language search: /api/v1, clip-back compatible endpoints, thumbnails, metrics.",
        docs_url=None,  # /docs is served from the installed swagger-ui-bundle-v2 package, not a CDN
        redoc_url=None,
    )
    app.state.config = config
    app.state.served = served or ServedIndexes(
        config.indexes, config.device, config.poll_s, config.warm, config.freeze_gc, ray=config.ray
    )
    app.state.thumbnails = ThumbnailCache(config.thumbnail_cache_bytes)
    app.state.metrics = Metrics()
    app.state.search_threads = SearchThreads(config.search_threads)
    app.state.fetch_policy = FetchPolicy(
        config.allow_image_urls, config.allow_private_urls, config.image_url_timeout_s, config.image_url_max_bytes
    )
    add_error_handlers(app)
    add_plain_routes(app, config)
    add_docs_routes(app)
    app.include_router(api_v1.router)
    app.include_router(clip_back.router)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(ApiKey, key=config.api_key)
    app.add_middleware(Cors)
    app.add_middleware(AccessLog, metrics=app.state.metrics)
    return app
