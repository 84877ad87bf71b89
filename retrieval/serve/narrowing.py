"""What ``/api/v1/search`` takes besides its queries, as the CLI and the ``Index`` API do: one
:class:`~retrieval.core.search.SearchOptions` from the body's ``route``, ``nprobe``, ``ef_search``, ``where``
(SQL), ``min_score``, ``offset`` and ``dedup`` (true for the default cosine, or a cosine), and query
arithmetic (``plus`` / ``minus`` parts on a text or image query: ``{"text": ...}`` or ``{"image": base64}``,
each with an optional ``weight``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from retrieval.api.dedup import DEFAULT_THRESHOLD
from retrieval.core.errors import InputError
from retrieval.core.query import QueryPart
from retrieval.core.search import SearchKnobs, SearchOptions
from retrieval.serve.errors import ApiError, refused
from retrieval.serve.parse import get_float, get_int, get_str

MAX_WHERE = 2_000
MAX_PARTS = 8  # plus + minus parts of one query
MAX_KNOB = 1 << 20


def parse_options(body: dict[str, Any], max_k: int) -> SearchOptions:
    """The search options of a body (each field optional); a bad one is a 422 naming its field."""
    dedup = body.get("dedup")
    if dedup is True:
        threshold: float | None = DEFAULT_THRESHOLD
    elif dedup in (None, False):
        threshold = None
    else:
        threshold = get_float(body, "dedup")
        if threshold is None or not 0 < threshold <= 1:
            raise ApiError(422, "dedup must be true, false or a cosine in (0, 1]")
    knobs = SearchKnobs(
        nprobe=get_int(body, "nprobe", None, 1, MAX_KNOB), ef_search=get_int(body, "ef_search", None, 1, MAX_KNOB)
    )
    try:
        return SearchOptions(
            route=get_str(body, "route", 40),
            knobs=knobs,
            where=get_str(body, "where", MAX_WHERE),
            min_score=get_float(body, "min_score"),
            offset=get_int(body, "offset", 0, 0, max_k) or 0,
            dedup=threshold,
        )
    except InputError as e:
        raise refused(e) from None


def parse_parts(query: dict[str, Any], decode_image: Callable[[str], Any], max_text: int) -> tuple[QueryPart, ...]:
    """The ``plus`` and ``minus`` parts of one query, signed."""
    parts: list[QueryPart] = []
    for key, sign in (("plus", 1.0), ("minus", -1.0)):
        given = query.get(key)
        if given is None:
            continue
        if not isinstance(given, list):
            raise ApiError(422, f'{key} must be a list of {{"text": ...}} or {{"image": base64}} parts')
        for part in given:
            parts.append(_part(part, key, sign, decode_image, max_text))
    if len(parts) > MAX_PARTS:
        raise ApiError(422, f"at most {MAX_PARTS} plus/minus parts per query, got {len(parts)}")
    return tuple(parts)


def _part(part: Any, key: str, sign: float, decode_image: Callable[[str], Any], max_text: int) -> QueryPart:
    if not isinstance(part, dict) or sum(part.get(name) is not None for name in ("text", "image")) != 1:
        raise ApiError(422, f"each {key} part needs exactly one of text, image")
    weight = get_float(part, "weight")
    weight = 1.0 if weight is None else weight
    if weight <= 0:
        raise ApiError(422, f"a {key} part's weight must be > 0 (the sign comes from {key})")
    if part.get("text") is not None:
        text = get_str(part, "text", max_text)
        if not text:
            raise ApiError(422, f"a {key} part's text is empty")
        return QueryPart(sign * weight, "text", text)
    image = get_str(part, "image")
    if not image:
        raise ApiError(422, f"a {key} part's image is empty")
    return QueryPart(sign * weight, "image", decode_image(image))
