"""Query arithmetic on the query commands: ``--plus``, ``--minus``, ``--plus-image`` and ``--minus-image``.

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

from retrieval.api.routes import image_id
from retrieval.cli.common import option_group
from retrieval.core.errors import InputError
from retrieval.core.query import Query, QueryPart
from retrieval.core.search import SearchOptions
from retrieval.sources.items import IMAGE_EXTENSIONS

WEIGHT_MARK = "::"


@dataclass(frozen=True)
class Composition:
    """The extra parts every query of a command gets."""

    parts: tuple[QueryPart, ...] = ()

    @property
    def active(self) -> bool:
        """Whether the queries go through :meth:`~retrieval.api.engine.Index.search` (they have extra parts)."""
        return bool(self.parts)

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
    plus: Sequence[str], minus: Sequence[str], plus_image: Sequence[str], minus_image: Sequence[str]
) -> Composition:
    parts = [parse_part(v, 1.0) for v in plus] + [parse_part(v, 1.0, True) for v in plus_image]
    parts += [parse_part(v, -1.0) for v in minus] + [parse_part(v, -1.0, True) for v in minus_image]
    return Composition(tuple(parts))


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
    ],
    _composition,
)
"""Options of the query commands: one ``composition: Composition``."""


def text_asker(
    composition: Composition,
    target: str,
    k: int,
    options: SearchOptions,
    plain: Callable[[Any, list[str]], list[list[Any]]],
) -> Callable[[Any, list[str]], list[list[Any]]]:
    """``plain`` (the batch query), or with arithmetic one :meth:`Index.search` per text."""
    if not composition.active:
        return plain
    return lambda index, texts: [
        index.search(composition.query(Query.text(text)), target, k, options) for text in texts
    ]


def image_asker(
    composition: Composition,
    target: str,
    k: int,
    options: SearchOptions,
    exclude_self: bool,
    plain: Callable[[Any, list[Any], Any], list[list[Any]]],
) -> Callable[[Any, list[Any], Any], list[list[Any]]]:
    """``plain`` (the batch query), or with arithmetic one :meth:`Index.search` per image
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
                options,
                exclude=[own] if exclude_self and own else [],
            )
            for picture, own in zip(pictures, ids, strict=True)
        ]

    return ask
