"""The wire format of clip-retrieval 2.45's ``clip-retrieval back``: ``/knn-service``, ``/metadata``,
``/indices-list`` and ``/config.json``, so that clip-front and ``ClipClient`` work unchanged.

Differences, on purpose: bad input answers 4xx with ``{"error": ...}`` where clip back answers 500;
``num_images`` and ``num_result_ids`` are capped at the server's ``max_k``; ``image`` in a result is a
JPEG thumbnail (at most 256 px), not the full image; ``deduplicate`` keeps a result unless its stored
vector has inner product >= 0.94 with a better result already kept (clip back merges chains of such
pairs); ``use_mclip``, ``use_safety_model``, ``use_violence_detector``, ``aesthetic_score`` and
``aesthetic_weight`` are accepted and change nothing (there are no such models here). Ids: an image's
row position, or ``2**40 +`` a caption's row position (see :mod:`retrieval.serve.records`).
"""

from __future__ import annotations

import base64
import contextlib
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from retrieval.api.dedup import distinct
from retrieval.serve.api_v1 import MAX_TEXT, snapshot_of
from retrieval.serve.errors import ApiError
from retrieval.serve.fetch import fetch_image_url
from retrieval.serve.parse import (
    as_int,
    get_bool,
    get_float,
    get_int,
    get_str,
    get_vector,
    parse_json_object,
)
from retrieval.serve.queries import (
    Found,
    Query,
    decode_base64_image,
    decode_image_bytes,
    run_query,
    vector_query,
)
from retrieval.serve.records import (
    compat_id,
    compat_image_position,
    compat_metadata,
    from_compat_id,
)
from retrieval.serve.responses import SafeJSON
from retrieval.serve.served import Snapshot

router = APIRouter()
DUPLICATE_SIMILARITY = 0.94
MAX_METADATA_IDS = 10_000
IGNORED_FLOATS = ("aesthetic_score", "aesthetic_weight")
IGNORED_FLAGS = ("use_mclip", "use_safety_model", "use_violence_detector")


def compat_query(request: Request, snapshot: Snapshot, data: dict[str, Any]) -> Query:
    """The query of a knn request; precedence: non-empty text, then image, then image_url, then embedding_input."""
    text = get_str(data, "text", MAX_TEXT)
    if text is not None:
        return Query(text=text)
    image = get_str(data, "image")
    if image is not None:
        return Query(image=decode_base64_image(image))
    url = get_str(data, "image_url", 4096)
    if url is not None:
        return Query(image=decode_image_bytes(fetch_image_url(url, request.app.state.fetch_policy), "image_url"))
    if data.get("embedding_input") is not None:
        values = get_vector(data["embedding_input"], "embedding_input")
        encoders = snapshot.index.manifest["encoders"]
        modality = next((m for m in ("image", "text") if int(encoders[m]["dim"]) == len(values)), None)
        if modality is None:
            raise ApiError(
                422,
                f"embedding_input has {len(values)} numbers; index {snapshot.name} takes "
                f"{encoders['image']['dim']} (image space) or {encoders['text']['dim']} (text space)",
            )
        return vector_query(snapshot, values, modality)
    raise ApiError(422, "fill one of text, image, image_url, embedding_input")


def deduplicated(snapshot: Snapshot, kind: str, found: list[Found]) -> list[Found]:
    """``found`` without the results whose stored vector is a near-duplicate (IP >= 0.94) of a better kept one:
    the rule of ``--dedup`` (:func:`retrieval.api.dedup.distinct`) at clip back's threshold."""
    return [found[row] for row in distinct(snapshot.index, kind, [f.position for f in found], DUPLICATE_SIMILARITY)]


def with_metadata(request: Request, snapshot: Snapshot, kind: str, position: int) -> dict[str, Any]:
    """clip back's metadata of one item, with ``image`` (a base64 JPEG thumbnail) when its image can be read."""
    meta = compat_metadata(snapshot, kind, position)
    image = compat_image_position(snapshot, kind, position)
    if image is not None:
        with contextlib.suppress(ApiError):
            meta["image"] = base64.b64encode(request.app.state.thumbnails.get(snapshot, image)).decode("ascii")
    return meta


def knn(request: Request, data: dict[str, Any]) -> list[dict[str, Any]]:
    """Answer one parsed knn request (on a worker thread)."""
    max_k = request.app.state.config.max_k
    snapshot = snapshot_of(request, get_str(data, "indice_name", 200))
    kind = "image" if data.get("modality") == "image" else "caption"
    num_images = min(get_int(data, "num_images", 40, 0), max_k)
    num_result_ids = min(get_int(data, "num_result_ids", num_images, 0), max_k)
    deduplicate = get_bool(data, "deduplicate", False)
    for key in IGNORED_FLAGS:
        get_bool(data, key, False)
    for key in IGNORED_FLOATS:
        get_float(data, key)
    query = compat_query(request, snapshot, data)
    if num_result_ids == 0:
        return []
    found = run_query(snapshot, query, kind, num_result_ids, threads=request.app.state.search_threads)
    if deduplicate:
        found = deduplicated(snapshot, kind, found)
    results = []
    for rank, f in enumerate(found):
        out = with_metadata(request, snapshot, kind, f.position) if rank < num_images else {}
        out.update(id=compat_id(kind, f.position), similarity=f.score)
        results.append(out)
    return results


@router.post("/knn-service")
async def knn_service(request: Request) -> Response:
    """clip back's search: the body is JSON whatever its Content-Type."""
    data = parse_json_object(await request.body())
    return SafeJSON(await run_in_threadpool(knn, request, data))


def metadata(request: Request, data: dict[str, Any]) -> list[dict[str, Any]]:
    snapshot = snapshot_of(request, get_str(data, "indice_name", 200))
    ids = data.get("ids", [])
    if not isinstance(ids, list):
        raise ApiError(422, "ids must be a list of whole numbers")
    if len(ids) > MAX_METADATA_IDS:
        raise ApiError(422, f"at most {MAX_METADATA_IDS} ids per request")
    numbers = [as_int(value, "each id") for value in ids]
    out = []
    for number in numbers:
        kind, position = from_compat_id(number)
        meta = with_metadata(request, snapshot, kind, position) if snapshot.is_live(kind, position) else None
        out.append({"id": number, "metadata": meta})
    return out


@router.post("/metadata")
async def metadata_service(request: Request) -> Response:
    """``{"ids": [...], "indice_name": ...}`` -> ``[{"id", "metadata"}]`` in request order (null for an unknown id)."""
    data = parse_json_object(await request.body())
    return SafeJSON(await run_in_threadpool(metadata, request, data))


@router.get("/indices-list")
def indices_list(request: Request) -> Response:
    """The served index names, default first."""
    return SafeJSON(request.app.state.served.names())


@router.get("/config.json")
def config_json(request: Request) -> Response:
    """What clip-front reads at start: the back end's URL, the default index, the URL column."""
    backend = str(request.base_url).rstrip("/")
    return SafeJSON({"defaultBackend": backend, "defaultIndex": request.app.state.served.default, "urlColumn": "url"})
