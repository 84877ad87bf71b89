"""Query arithmetic and near-duplicate collapsing on the query commands: ``--plus``, ``--minus``,
``--plus-image``, ``--minus-image``, ``--dedup`` and ``--dedup-threshold``.

``--plus VALUE`` adds a part of weight 1 and ``--minus VALUE`` one of weight -1; a VALUE that names an
existing image file is an image part, anything else a text (``--plus-image`` / ``--minus-image`` force an
image). ``VALUE::W`` sets the weight's size to W, e.g. ``--minus "grass::0.5"``. Each query of the command
(QUERY, each IMAGE, each line of ``--queries-file``) gets the same extra parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from retrieval.api.dedup import DEFAULT_THRESHOLD
from retrieval.api.routes import image_id
from retrieval.cli.common import option_group
from retrieval.core.errors import InputError
from retrieval.core.query import Query, QueryPart
from retrieval.index.spec import SearchKnobs
from retrieval.sources.items import IMAGE_EXTENSIONS

WEIGHT_MARK = "::"


@dataclass(frozen=True)
class Composition:
    """The extra parts every query of a command gets, and the near-duplicate threshold (None: keep all)."""

    parts: tuple[QueryPart, ...] = ()
    dedup: float | None = None

    @property
    def active(self) -> bool:
        """Whether the queries go through :meth:`~retrieval.api.engine.Index.search` (arithmetic or --dedup)."""
        return bool(self.parts) or self.dedup is not None

    def query(self, base: Query) -> Query:
        """``base`` with the extra parts."""
        return Query(base.parts + self.parts)


def parse_part(value: str, sign: float, force_image: bool = False) -> QueryPart:
    """One ``--plus`` / ``--minus`` value: ``VALUE`` or ``VALUE::W``; an existing image file is an image part."""
    weight = 1.0
    if WEIGHT_MARK in value:
        head, _, tail = value.rpartition(WEIGHT_MARK)
        try:
            weight = float(tail)
        except ValueError:
            raise InputError(f"{value!r}: the weight after {WEIGHT_MARK!r} must be a number, got {tail!r}") from None
        if weight <= 0:
            raise InputError(f"{value!r}: the weight after {WEIGHT_MARK!r} must be > 0 (use --minus to subtract)")
        value = head
    path = Path(value)
    if force_image or (path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()):
        if not path.is_file():
            raise InputError(f"{value}: no such image file")
        return QueryPart(sign * weight, "image", str(path))
    return QueryPart(sign * weight, "text", value)


def _composition(
    plus: Sequence[str],
    minus: Sequence[str],
    plus_image: Sequence[str],
    minus_image: Sequence[str],
    dedup: bool,
    dedup_threshold: float | None,
) -> Composition:
    parts = [parse_part(v, 1.0) for v in plus] + [parse_part(v, 1.0, True) for v in plus_image]
    parts += [parse_part(v, -1.0) for v in minus] + [parse_part(v, -1.0, True) for v in minus_image]
    threshold = dedup_threshold if dedup_threshold is not None else (DEFAULT_THRESHOLD if dedup else None)
    return Composition(tuple(parts), threshold)


composition_options = option_group(
    "composition",
    [
        click.option(
            "--plus",
            multiple=True,
            metavar="VALUE[::W]",
            help="Add a text, or an image file, to the query (weight 1 or W; repeatable).",
        ),
        click.option(
            "--minus",
            multiple=True,
            metavar="VALUE[::W]",
            help="Subtract a text, or an image file, from the query (weight 1 or W; repeatable).",
        ),
        click.option("--plus-image", multiple=True, metavar="PATH[::W]", help="Add an image (never read as text)."),
        click.option(
            "--minus-image", multiple=True, metavar="PATH[::W]", help="Subtract an image (never read as text)."
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
    _composition,
)
"""Options of the query commands: one ``composition: Composition``."""


def text_asker(
    composition: Composition,
    target: str,
    k: int,
    route: str | None,
    knobs: SearchKnobs,
    narrowing: dict[str, Any],
    plain: Callable[[Any, list[str]], list[list[Any]]],
) -> Callable[[Any, list[str]], list[list[Any]]]:
    """``plain`` (the batch query), or with arithmetic / --dedup one :meth:`Index.search` per text
    (``narrowing``: where / min_score / offset, as the query methods take them)."""
    if not composition.active:
        return plain
    return lambda index, texts: [
        index.search(composition.query(Query.text(text)), target, k, route, knobs, composition.dedup, **narrowing)
        for text in texts
    ]


def image_asker(
    composition: Composition,
    target: str,
    k: int,
    route: str | None,
    knobs: SearchKnobs,
    exclude_self: bool,
    narrowing: dict[str, Any],
    plain: Callable[[Any, list[Any], Any], list[list[Any]]],
) -> Callable[[Any, list[Any], Any], list[list[Any]]]:
    """``plain`` (the batch query), or with arithmetic / --dedup one :meth:`Index.search` per image
    (``exclude_self``: each query image's own id left out)."""
    if not composition.active:
        return plain

    def ask(index: Any, pictures: list[Any], ids: Sequence[str | None] | None) -> list[list[Any]]:
        ids = list(ids) if ids is not None else [image_id(picture) for picture in pictures]
        return [
            index.search(
                composition.query(Query.image(picture)),
                target,
                k,
                route,
                knobs,
                composition.dedup,
                exclude=[own] if exclude_self and own else [],
                **narrowing,
            )
            for picture, own in zip(pictures, ids, strict=True)
        ]

    return ask
