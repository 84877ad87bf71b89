"""``--where``, ``--min-score`` and ``--offset``: the options every query command takes to narrow its results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from retrieval.cli.common import option_group


@dataclass(frozen=True)
class Narrowing:
    """A filter (SQL predicate), a score cutoff and a page offset, as the query methods of ``Index`` take them."""

    where: str | None = None
    min_score: float | None = None
    offset: int = 0

    def api(self) -> dict[str, Any]:
        """The keyword arguments of the ``Index`` query methods."""
        return {"where": self.where, "min_score": self.min_score, "offset": self.offset}


narrowing_options = option_group(
    "narrowing",
    [
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
    ],
    lambda where, min_score, offset: Narrowing(where, min_score, offset),
)
"""Decorator: a query command receives ``narrowing: Narrowing``."""
