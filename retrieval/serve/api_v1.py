"""``/api/v1``: index info, search (several queries per request), one item by id, thumbnails.

Errors answer ``{"error": "one-line message"}`` with a 4xx status. Searches run on the thread pool.
"""

from __future__ import annotations

import re
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from retrieval.api.routes import MODALITY
from retrieval.serve.errors import ApiError
from retrieval.serve.narrowing import parse_options, parse_parts
from retrieval.serve.parse import (
    get_bool,
    get_int,
    get_str,
    get_vector,
    parse_json_object,
)
from retrieval.serve.queries import (
    Query,
    decode_base64_image,
    route_of,
    run_query,
    vector_query,
)
from retrieval.serve.records import MAX_ROWS, hit, item_record
from retrieval.serve.responses import SafeJSON
from retrieval.serve.served import KINDS, Snapshot
from retrieval.serve.thumbnails import DEFAULT_SIZE

router = APIRouter(prefix="/api/v1")
ID_PATTERN = re.compile(r"^[0-9]{1,15}$")
MAX_TEXT = 10_000
SEARCH_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["queries"],
                    "properties": {
                        "index": {"type": "string", "nullable": True},
                        "target": {"enum": ["image", "caption"]},
                        "k": {"type": "integer", "minimum": 1, "default": 20},
                        "route": {"type": "string", "nullable": True},
                        "nprobe": {"type": "integer", "minimum": 1},
                        "ef_search": {"type": "integer", "minimum": 1},
                        "exclude_self": {"type": "boolean", "default": True},
                        "where": {
                            "type": "string",
                            "nullable": True,
                            "description": "SQL predicate over the item columns and metadata fields",
                        },
                        "min_score": {"type": "number", "nullable": True},
                        "offset": {"type": "integer", "minimum": 0, "default": 0},
                        "dedup": {"description": "true (default cosine) or a cosine: collapse near-duplicate results"},
                        "queries": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "description": 'one of {"text": str}, {"image": base64}, '
                                '{"item": {"kind", "id"}}, {"vector": [float]}; a text or image query may add '
                                '"plus" / "minus": [{"text": str} or {"image": base64}, optional "weight"]',
                            },
                        },
                    },
                }
            }
        },
    }
}


def snapshot_of(request: Request, name: str | None) -> Snapshot:
    """The current build of index ``name`` (None: the default); 404 for an unknown name."""
    served = request.app.state.served.get(name)
    if served is None:
        raise ApiError(404, f"no index {str(name)[:80]!r}; see /api/v1/indexes")
    return served.snapshot()


def parse_id(text: str, what: str = "id") -> int:
    if not ID_PATTERN.match(text) or int(text) >= MAX_ROWS:
        raise ApiError(404, f"no such {what} {text[:40]!r}: ids are whole numbers from 0")
    return int(text)


def describe(snapshot: Snapshot) -> dict[str, Any]:
    index = snapshot.index
    return {
        "name": snapshot.name,
        "mode": index.mode,
        "images": snapshot.count("image"),
        "captions": snapshot.count("caption"),
        "build": snapshot.build,
        "routes": {
            query: index.routes_for(query)
            for query in ("text_to_image", "image_to_caption", "image_to_image", "text_to_caption")
        },
    }


@router.get("/indexes")
def list_indexes(request: Request) -> Response:
    """The served indexes, default first."""
    served = request.app.state.served
    return SafeJSON({"default": served.default, "indexes": [describe(s.snapshot()) for s in served.by_name.values()]})


@router.get("/indexes/{name}")
def index_info(name: str, request: Request) -> Response:
    """``Index.info()`` of one index, with its name and build."""
    snapshot = snapshot_of(request, name)
    info = snapshot.index.info()
    info.pop("path", None)  # the server's file system is not the caller's business
    return SafeJSON({**info, "name": snapshot.name, "build": snapshot.build})


def parse_query(snapshot: Snapshot, q: Any, target: str) -> Query:
    """One query of a search body: exactly one of text, image, item, vector."""
    if not isinstance(q, dict):
        raise ApiError(422, "each query must be an object with one of text, image, item, vector")
    given = [key for key in ("text", "image", "item", "vector") if q.get(key) is not None]
    if len(given) != 1:
        raise ApiError(422, f"each query needs exactly one of text, image, item, vector; got {given or 'none'}")
    parts = parse_parts(q, decode_base64_image, MAX_TEXT)
    if given == ["text"]:
        text = get_str(q, "text", MAX_TEXT)
        if text is None:
            raise ApiError(422, "the query text is empty")
        return Query(text=text, parts=parts)
    if given == ["image"]:
        image = get_str(q, "image")
        if image is None:
            raise ApiError(422, "the query image is empty")
        return Query(image=decode_base64_image(image), parts=parts)
    if parts:
        raise ApiError(422, "plus / minus parts go with a text or image query, not a vector or an item")
    if given == ["vector"]:
        return vector_query(snapshot, get_vector(q["vector"], "vector"), MODALITY[target])
    item = q["item"]
    if not isinstance(item, dict) or item.get("kind") not in KINDS:
        raise ApiError(422, 'item must be {"kind": "image" or "caption", "id": N}')
    position = get_int(item, "id", None, 0, MAX_ROWS - 1)
    if position is None:
        raise ApiError(422, "item needs an id")
    return Query(item=(item["kind"], position))


def search_body(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    """Run a parsed search body (on a worker thread)."""
    started = time.perf_counter()
    config = request.app.state.config
    snapshot = snapshot_of(request, get_str(body, "index", 200))
    target = body.get("target", "image")
    if target not in KINDS:
        raise ApiError(422, "target must be 'image' or 'caption'")
    k = get_int(body, "k", 20, 1, config.max_k) or 20
    exclude_self = get_bool(body, "exclude_self", True)
    options = parse_options(body, config.max_k)
    queries = body.get("queries")
    if not isinstance(queries, list) or not queries:
        raise ApiError(422, "queries must be a non-empty list")
    if len(queries) > config.max_queries:
        raise ApiError(422, f"at most {config.max_queries} queries per request, got {len(queries)}")
    parsed = [parse_query(snapshot, q, target) for q in queries]
    results = []
    for number, query in enumerate(parsed):
        route = route_of(snapshot, query, target, options)
        threads = request.app.state.search_threads
        found = run_query(snapshot, query, target, k, options.replace(route=route), exclude_self, threads)
        hits = [hit(snapshot, target, f.position, f.score, rank) for rank, f in enumerate(found, start=1)]
        results.append({"query": number, "route": route, "hits": hits})
    took = (time.perf_counter() - started) * 1000
    return {"index": snapshot.name, "build": snapshot.build, "took_ms": round(took, 3), "results": results}


@router.post("/search", openapi_extra=SEARCH_SCHEMA)
async def search(request: Request) -> Response:
    """Text -> image, image -> caption, image -> image, text -> caption, vector or item -> nearest; k capped."""
    body = parse_json_object(await request.body())
    return SafeJSON(await run_in_threadpool(search_body, request, body))


@router.get("/items/{kind}/{item_id}")
def item(kind: str, item_id: str, request: Request, index: str | None = None) -> Response:
    """Every stored column of one item."""
    snapshot = snapshot_of(request, index)
    return SafeJSON(item_record(snapshot, kind, parse_id(item_id)))


@router.get("/thumbnails/{item_id}", response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
def thumbnail(item_id: str, request: Request, index: str | None = None, size: str = str(DEFAULT_SIZE)) -> Response:
    """A JPEG thumbnail of one indexed image (made on demand, cached)."""
    snapshot = snapshot_of(request, index)
    position = parse_id(item_id, "image")
    if not ID_PATTERN.match(size):
        raise ApiError(422, "size must be a whole number")
    data = request.app.state.thumbnails.get(snapshot, position, int(size))
    return Response(data, media_type="image/jpeg", headers={"cache-control": "public, max-age=3600"})
