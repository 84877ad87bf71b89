"""Score cutoffs and paging of hit lists: ``min_score=`` drops weaker hits, ``offset=`` skips the first ones.

A query for ``k`` hits at ``offset`` searches ``offset + k`` and keeps hits ``offset`` to ``offset + k - 1``
(their ranks continue: page 2 of 10 holds ranks 11 to 20, the same hits as results 10..19 of a query
for 20). Hits come sorted by descending score, ties by id (see :func:`retrieval.api.routes.image_hits`),
so pages of one query never overlap or skip a hit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TypeVar

from retrieval.core.errors import InputError

Hit = TypeVar("Hit")


def check_paging(offset: int, min_score: float | None) -> None:
    """Refuse a negative or non-integer ``offset`` and a ``min_score`` that is not a finite number."""
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise InputError(f"offset must be an integer >= 0, got {offset!r}")
    if min_score is not None and (
        isinstance(min_score, bool) or not isinstance(min_score, numbers.Real) or not math.isfinite(min_score)
    ):
        raise InputError(f"min_score must be a finite number, got {min_score!r}")


def page(hits: Sequence[Sequence[Hit]], offset: int = 0, min_score: float | None = None) -> list[list[Hit]]:
    """Each hit list without its first ``offset`` hits and without hits scoring below ``min_score``."""
    return [[hit for hit in row[offset:] if min_score is None or hit.score >= min_score] for row in hits]  # type: ignore[attr-defined]
