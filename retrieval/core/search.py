"""What every query of an index takes besides its inputs and ``k``: :class:`SearchOptions` (the route, the
vector index's knobs, a ``where`` filter, a score cutoff, a page offset, near-duplicate collapsing).

One frozen object, checked once when it is made, is taken by each query method of
:class:`~retrieval.api.engine.Index`, by ``/api/v1/search`` and by the CLI's query commands. Errors
name what the caller set in backticks (`SearchOptions.min_score`, a method's `k`); the command line
says its flags instead (``retrieval.cli.common.FLAGS``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from retrieval.core.errors import InputError

ROUTES = ("clip", "asif", "projected", "unimodal")  # every route of some query (which ones: Index.routes_for)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_k(k: Any) -> int:
    """``k`` (hits per query) as an int >= 1; an error naming ``k`` otherwise."""
    if not _is_int(k) or k < 1:
        raise InputError(f"`k` must be an integer >= 1, got {k!r}")
    return int(k)


@dataclass(frozen=True)
class SearchKnobs:
    """Search-time settings: IVF ``nprobe``, HNSW ``ef_search``, shortlist factor for re-ranking (None: as tuned)."""

    nprobe: int | None = None
    ef_search: int | None = None
    rerank_factor: int | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and (not _is_int(value) or value < 1):
                raise InputError(f"`SearchKnobs.{name}` must be an integer >= 1, got {value!r}")

    def to_json(self) -> dict[str, int]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> SearchKnobs:
        data = data or {}
        return cls(**{key: int(data[key]) for key in cls.__dataclass_fields__ if data.get(key) is not None})

    def override(self, other: SearchKnobs) -> SearchKnobs:
        """These knobs with every value that ``other`` sets replaced."""
        return SearchKnobs(**{**self.to_json(), **other.to_json()})


@dataclass(frozen=True)
class SearchOptions:
    """How a query searches and which of its hits it returns.

    ``route``: how the query reaches the items (``clip``, ``asif``, ``projected``, ``unimodal``; None: the
    query's default, see :meth:`~retrieval.api.engine.Index.routes_for`); ``knobs``: the vector index's
    search settings (nprobe, ef_search); ``where``: a SQL predicate over the item columns and metadata
    fields that only the items it holds for pass, applied inside the search; ``min_score``: hits scoring
    below it are dropped; ``offset``: hits skipped (paging: ``offset=10`` with ``k=10`` is the second page);
    ``dedup``: a cosine: a hit whose stored vector is at least this close to a better hit's is dropped
    (None: keep all). Hits are ranked, collapsed, paged, then cut at ``min_score``.
    """

    route: str | None = None
    knobs: SearchKnobs = field(default_factory=SearchKnobs)
    where: str | None = None
    min_score: float | None = None
    offset: int = 0
    dedup: float | None = None

    def __post_init__(self) -> None:
        if self.route is not None and self.route not in ROUTES:
            raise InputError(f"`SearchOptions.route` must be one of {', '.join(ROUTES)}, got {self.route!r}")
        if not isinstance(self.knobs, SearchKnobs):
            raise InputError(f"`SearchOptions.knobs` must be a SearchKnobs, got {type(self.knobs).__name__}")
        if self.where is not None and (not isinstance(self.where, str) or not self.where.strip()):
            raise InputError(f"`SearchOptions.where` must be a non-empty SQL predicate, got {self.where!r}")
        if self.min_score is not None and not _is_finite(self.min_score):
            raise InputError(f"`SearchOptions.min_score` must be a finite number, got {self.min_score!r}")
        if not _is_int(self.offset) or self.offset < 0:
            raise InputError(f"`SearchOptions.offset` must be an integer >= 0, got {self.offset!r}")
        if self.dedup is not None and not (_is_finite(self.dedup) and 0 < self.dedup <= 1):
            raise InputError(f"`SearchOptions.dedup` must be a cosine in (0, 1], got {self.dedup!r}")

    def replace(self, **changes: Any) -> SearchOptions:
        """A copy with ``changes`` (checked like a new one)."""
        return replace(self, **changes)


def _is_finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def options_or_default(options: SearchOptions | None) -> SearchOptions:
    """``options``, or the defaults for None; anything else is an error naming ``options``."""
    if options is None:
        return DEFAULT_OPTIONS
    if not isinstance(options, SearchOptions):
        raise InputError(f"`options` must be a SearchOptions, got {type(options).__name__}")
    return options


DEFAULT_OPTIONS = SearchOptions()
