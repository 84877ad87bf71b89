"""What ``/api/v1/search`` adds to a plain query, as the CLI and the ``Index`` API do: a SQL filter
(``where``), a score cutoff (``min_score``), paging (``offset``), near-duplicate collapsing
(``dedup``: true for the default cosine, or a cosine) and query arithmetic (``plus`` / ``minus``
parts on a text or image query: ``{"text": ...}`` or ``{"image": base64}``, each with an optional
``weight``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from retrieval.api.dedup import DEFAULT_THRESHOLD, distinct
from retrieval.serve.errors import ApiError
from retrieval.serve.parse import get_float, get_int, get_str

MAX_WHERE = 2_000
MAX_PARTS = 8  # plus + minus parts of one query


@dataclass(frozen=True)
class Narrowing:
    """``where``, ``min_score``, ``offset`` and ``dedup`` (a cosine, or None) of one search request."""

    where: str | None = None
    min_score: float | None = None
    offset: int = 0
    dedup: float | None = None

    def fetch(self, k: int) -> int:
        """Results to ask the index for so that ``k`` remain after paging and collapsing."""
        return (k + self.offset) * (3 if self.dedup is not None else 1)

    def apply(self, index: Any, kind: str, found: list[Any], k: int) -> list[Any]:
        """``found`` (best first, ``.position`` / ``.score``) collapsed, paged and cut at ``min_score``."""
        if self.dedup is not None:
            found = [found[row] for row in distinct(index, kind, [f.position for f in found], self.dedup)]
        found = found[self.offset : self.offset + k]
        return [f for f in found if self.min_score is None or f.score >= self.min_score]


def parse_narrowing(body: dict[str, Any], max_k: int) -> Narrowing:
    """The narrowing fields of a search body (each optional); a bad one is a 422."""
    dedup = body.get("dedup")
    if dedup is True:
        threshold: float | None = DEFAULT_THRESHOLD
    elif dedup in (None, False):
        threshold = None
    else:
        threshold = get_float(body, "dedup")
        if threshold is None or not 0 < threshold <= 1:
            raise ApiError(422, "dedup must be true, false or a cosine in (0, 1]")
    return Narrowing(
        where=get_str(body, "where", MAX_WHERE),
        min_score=get_float(body, "min_score"),
        offset=get_int(body, "offset", 0, 0, max_k) or 0,
        dedup=threshold,
    )


def parse_parts(
    query: dict[str, Any], decode_image: Callable[[str], Any], max_text: int
) -> tuple[tuple[float, str, Any], ...]:
    """The ``plus`` and ``minus`` parts of one query as (weight, modality, value) tuples."""
    parts: list[tuple[float, str, Any]] = []
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


def _part(
    part: Any, key: str, sign: float, decode_image: Callable[[str], Any], max_text: int
) -> tuple[float, str, Any]:
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
        return sign * weight, "text", text
    image = get_str(part, "image")
    if not image:
        raise ApiError(422, f"a {key} part's image is empty")
    return sign * weight, "image", decode_image(image)
