"""Pure ASGI middleware (cheap per request): access log and metrics, CORS, the API key, the body-size limit."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qs

from retrieval.serve.errors import BodyTooLarge
from retrieval.serve.metrics import Metrics

log = logging.getLogger("retrieval.serve")
ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
CORS_HEADERS = [(b"access-control-allow-origin", b"*")]
OPEN_PATHS = ("/healthz", "/", "/favicon.ico")  # never need the API key (nor does anything under /page/)


async def send_json(
    send: Callable[..., Any], status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    data = json.dumps(body).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": data})


class AccessLog:
    """One log line per request (``METHOD PATH STATUS MS``) and its metrics, labelled by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or (
                "/page/*" if scope["path"].startswith("/page/") else "unmatched"
            )
            self.metrics.observe(scope["method"], route, status, seconds)
            log.info("%s %s %d %.1f", scope["method"], scope["path"], status, seconds * 1000)


class Cors:
    """``Access-Control-Allow-Origin: *`` on every response, errors included; any ``OPTIONS`` answered 204."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "OPTIONS":
            asked = dict(scope["headers"]).get(b"access-control-request-headers", b"authorization, content-type")
            headers = [
                *CORS_HEADERS,
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", asked),
                (b"access-control-max-age", b"600"),
                (b"content-length", b"0"),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *CORS_HEADERS]
            await send(message)

        await self.app(scope, receive, sending)


class ApiKey:
    """With a key set, every request but the open paths and the page needs ``Authorization: Bearer KEY``
    (or ``?key=KEY``, for what a browser loads by URL, such as thumbnails in ``<img>``)."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app, self.key = app, key.encode() if key else None

    def allowed(self, scope: dict) -> bool:
        path = scope["path"]
        if self.key is None or path in OPEN_PATHS or path.startswith("/page/"):
            return True
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return True
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key", [""])[0]
        return hmac.compare_digest(given.encode("latin-1", "replace"), self.key)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or self.allowed(scope):
            return await self.app(scope, receive, send)
        await send_json(
            send,
            401,
            {"error": "missing or wrong API key (send Authorization: Bearer KEY)"},
            [(b"www-authenticate", b"Bearer")],
        )


class BodyLimit:
    """Refuse bodies over ``limit`` bytes: at once by Content-Length, else while they stream in (413)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > self.limit):
            status = 413 if declared.strip().isdigit() else 400
            return await send_json(
                send, status, {"error": BodyTooLarge(self.limit).message if status == 413 else "bad Content-Length"}
            )
        received = 0

        async def receiving() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, receiving, send)
