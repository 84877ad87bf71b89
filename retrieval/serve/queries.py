"""One query against one snapshot: text, an image, a raw vector or a stored item, searching images or captions.

Shared by ``/api/v1/search`` and the clip-back ``/knn-service``. Every kind of query goes to the
``Index`` method that answers it, with the request's :class:`~retrieval.core.search.SearchOptions`;
results are (row position, score) pairs of the target kind; library errors about the input become 422s.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.api.compose import query_routes
from retrieval.api.routes import MODALITY, pick_route, query_name
from retrieval.core.errors import ImageDecodeError, InputError
from retrieval.core.query import Query as ComposedQuery
from retrieval.core.query import QueryPart
from retrieval.core.search import SearchOptions
from retrieval.serve.errors import ApiError, refused
from retrieval.serve.served import Snapshot
from retrieval.sources.images import decode_image

QUERY_MAX_PIXELS = 50_000_000  # a query image larger than this is refused as a likely decompression bomb


@dataclass(frozen=True)
class Query:
    """Exactly one of: ``text``; ``image`` (decoded PIL image); ``vector`` with its ``modality``; an ``item`` (kind,
    position)."""

    text: str | None = None
    image: Any = None
    vector: np.ndarray | None = None
    modality: str | None = None
    item: tuple[str, int] | None = None
    parts: tuple[QueryPart, ...] = ()  # weighted plus/minus parts added to a text or image query

    @property
    def query_modality(self) -> str:
        if self.text is not None:
            return "text"
        if self.image is not None:
            return "image"
        if self.item is not None:
            return MODALITY[self.item[0]]
        return self.modality or "image"

    def composed(self) -> ComposedQuery:
        """A text or image query with its plus/minus parts, as the ``Index`` API composes them."""
        base = QueryPart(1.0, "text", self.text) if self.text is not None else QueryPart(1.0, "image", self.image)
        return ComposedQuery((base, *self.parts))


@dataclass(frozen=True)
class Found:
    position: int
    score: float


def decode_base64_image(text: str, what: str = "image") -> Any:
    """A PIL image from base64 (a ``data:...;base64,`` prefix is accepted); not base64 or not an image -> 422."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{what} is not valid base64") from None
    return decode_image_bytes(data, what)


def decode_image_bytes(data: bytes, what: str) -> Any:
    try:
        return decode_image(data, what, max_pixels=QUERY_MAX_PIXELS).image
    except ImageDecodeError as e:
        raise ApiError(422, str(e)) from None


def vector_query(snapshot: Snapshot, values: list[float], modality: str) -> Query:
    """A raw vector in ``modality``'s encoder space, checked for its dimension and L2-normalised."""
    dim = int(snapshot.index.manifest["encoders"][modality]["dim"])
    if len(values) != dim:
        raise ApiError(
            422, f"the vector has {len(values)} numbers; {modality} vectors of index {snapshot.name} have {dim}"
        )
    vector = np.asarray(values, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise ApiError(422, "the vector must have a non-zero, finite length")
    return Query(vector=vector / norm, modality=modality)


class SearchThreads:
    """The OpenMP thread count of a query's search, set on the worker thread that runs it.

    OpenMP keeps its thread count per calling thread: unset, each thread pool worker that searches
    gets a team of one thread per core, and with many requests in flight those teams spin-wait
    against each other (measured on 2 cores: 0.2-0.5 ms more CPU per request, p99 ~280 ms at 32
    clients). Queries that need no encoder search with ``vector_queries`` threads; text and image
    queries keep the count of the thread that made this object, since torch may share the OpenMP
    runtime with FAISS and would otherwise encode on as few threads.
    """

    def __init__(self, vector_queries: int) -> None:
        import faiss

        self.vector_queries = vector_queries
        self.default = faiss.omp_get_max_threads()

    def apply(self, query: Query) -> None:
        import faiss

        wanted = self.default if query.text is not None or query.image is not None else self.vector_queries
        if faiss.omp_get_max_threads() != wanted:
            faiss.omp_set_num_threads(wanted)


def route_of(snapshot: Snapshot, query: Query, target: str, options: SearchOptions) -> str:
    """The route the query takes (``options.route`` checked), as :meth:`Index.routes_for` names it; a 422 when
    this query cannot take it."""
    index = snapshot.index
    if query.parts:
        available, what = query_routes(index.manifest, query.composed(), target), f"this query of {target}s"
    else:
        name = query_name(query.query_modality, target)
        available, what = index.routes_for(name), name.replace("_to_", " -> ")
    try:
        return pick_route(index.path, available, options.route, what)
    except InputError as e:
        raise refused(e, index.path, snapshot.name) from None


def run_query(
    snapshot: Snapshot,
    query: Query,
    target: str,
    k: int,
    options: SearchOptions | None = None,
    exclude_self: bool = True,
    threads: SearchThreads | None = None,
) -> list[Found]:
    """The ``k`` best ``target`` items (``image`` or ``caption``) for ``query``, best first, narrowed by
    ``options`` as the ``Index`` API narrows (searching with ``threads``); ``exclude_self``: an item query
    leaves its own item out of results of its kind."""
    if snapshot.count(target) == 0:
        return []
    if threads is not None:
        threads.apply(query)
    try:
        return _run(snapshot, query, target, k, options or SearchOptions(), exclude_self)
    except ImageDecodeError as e:
        raise ApiError(422, str(e)) from None
    except InputError as e:
        raise refused(e, snapshot.index.path, snapshot.name) from None


def _run(
    snapshot: Snapshot, query: Query, target: str, k: int, options: SearchOptions, exclude_self: bool
) -> list[Found]:
    index = snapshot.index
    if query.parts:
        return _from_hits(snapshot, target, index.search(query.composed(), target, k, options))
    if query.text is not None:
        search = index.text_to_image if target == "image" else index.text_to_caption
        return _from_hits(snapshot, target, search(query.text, k, options))
    if query.image is not None:
        ask = index.image_to_image if target == "image" else index.image_to_caption
        return _from_hits(snapshot, target, ask(query.image, k, options))
    exclude: list[str] = []
    vector = query.vector
    if query.item is not None:
        kind, position = query.item
        if not snapshot.is_live(kind, position):
            raise ApiError(404, f"no {kind} {position} in index {snapshot.name}")
        vector = snapshot.vectors(kind, np.array([position]))[0]
        exclude = [index.items(kind)["id"][position]] if exclude_self and kind == target else []
    if vector is None:
        raise ApiError(422, "the query has no text, image, vector or item")
    rows = vector[None, :].astype(np.float32)
    scores, positions = index.search_vectors(target, rows, query.query_modality, k, options, exclude=exclude)
    return [Found(int(p), float(s)) for s, p in zip(scores[0], positions[0], strict=True) if p >= 0]


def _from_hits(snapshot: Snapshot, kind: str, hits: Sequence[Any]) -> list[Found]:
    return [Found(snapshot.position_of(kind, hit.id), float(hit.score)) for hit in hits]
