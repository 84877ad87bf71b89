"""The options every query command takes, as one :class:`~retrieval.core.search.SearchOptions`: ``--route``,
``--nprobe``, ``--ef-search``, ``--where``, ``--min-score``, ``--offset``, ``--dedup`` and ``--dedup-threshold``."""

from __future__ import annotations

import click

from retrieval.api.dedup import DEFAULT_THRESHOLD
from retrieval.cli.common import option_group
from retrieval.core.search import ROUTES, SearchKnobs, SearchOptions


def _search_options(
    route: str | None,
    nprobe: int | None,
    ef_search: int | None,
    where: str | None,
    min_score: float | None,
    offset: int,
    dedup: bool,
    dedup_threshold: float | None,
) -> SearchOptions:
    threshold = dedup_threshold if dedup_threshold is not None else (DEFAULT_THRESHOLD if dedup else None)
    knobs = SearchKnobs(nprobe=nprobe, ef_search=ef_search)
    return SearchOptions(route, knobs, where, min_score, offset, threshold)


search_options = option_group(
    "options",
    [
        click.option(
            "--route",
            type=click.Choice(ROUTES),
            default=None,
            help="Route (default: the query's first in this index; see info: query_routes).",
        ),
        click.option(
            "--nprobe",
            type=click.IntRange(min=1),
            default=None,
            help="IVF lists to visit per query (default: tuned at build time; see info). Higher: better recall, "
            "slower.",
        ),
        click.option(
            "--ef-search",
            type=click.IntRange(min=1),
            default=None,
            help="HNSW search breadth (default: tuned at build time; see info).",
        ),
        click.option(
            "--where",
            default=None,
            metavar="SQL",
            help="Only items for which this SQL predicate holds, e.g. \"label IN ('cat', 'dog') AND width >= 1000\" or "
            "\"uri GLOB '*/2024/*'\": item columns (uri, source, label, width, height, added; captions: caption, "
            "image_uri), metadata fields by name (url) or as metadata.url.",
        ),
        click.option(
            "--min-score",
            type=float,
            default=None,
            help="Drop results scoring below this (the JSON says how many passed).",
        ),
        click.option(
            "--offset",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Skip this many results (paging: --offset 10 -k 10 is the second page of 10).",
        ),
        click.option(
            "--dedup",
            is_flag=True,
            help=(
                "Collapse near-duplicate results: drop a hit whose stored vector's cosine to a better hit is >= the "
                "threshold."
            ),
        ),
        click.option(
            "--dedup-threshold",
            type=click.FloatRange(0, 1, min_open=True),
            default=None,
            help=f"The cosine of --dedup (implies it; default {DEFAULT_THRESHOLD:g}).",
        ),
    ],
    _search_options,
)
"""Decorator: a query command receives ``options: SearchOptions``."""
