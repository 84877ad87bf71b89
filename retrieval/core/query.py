"""A composed query: weighted text and image parts, e.g. ``Query.text("a dog") + Query.text("in the snow")
- 0.5 * Query.text("grass")`` or ``Query.image("photo.jpg") + Query.text("at night")``.

The parts are combined into one query vector when searched (see :mod:`retrieval.api.compose` for the
space each route combines in): a weighted sum of the parts' unit vectors, renormalised.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.core.errors import InputError

QUERY_MODALITIES = ("text", "image")


@dataclass(frozen=True)
class QueryPart:
    """One weighted part: a text (``str``) or an image (a path, or a PIL image)."""

    weight: float
    modality: str
    value: Any

    def __post_init__(self) -> None:
        if self.modality not in QUERY_MODALITIES:
            raise InputError(f"a query part's modality must be 'text' or 'image', got {self.modality!r}")
        weight = self.weight
        if (
            isinstance(weight, bool)
            or not isinstance(weight, numbers.Real)
            or not math.isfinite(float(weight))
            or weight == 0
        ):
            raise InputError(f"a query part's weight must be a finite number other than 0, got {weight!r}")
        object.__setattr__(self, "weight", float(weight))
        if self.modality == "text" and (not isinstance(self.value, str) or not self.value.strip()):
            raise InputError("a text part of the query is empty")
        if self.modality == "image" and not (isinstance(self.value, (str, Path)) or hasattr(self.value, "convert")):
            raise InputError(f"an image part must be a path or a PIL image, got {type(self.value).__name__}")

    def describe(self) -> str:
        """The part as text: its value (an image as its path) with its weight when not 1."""
        what = (
            self.value
            if self.modality == "text"
            else f"<image {self.value if isinstance(self.value, (str, Path)) else 'PIL'}>"
        )
        return what if abs(self.weight) == 1 else f"{abs(self.weight):g}*{what}"


@dataclass(frozen=True)
class Query:
    """Weighted parts searched as one: ``+``, ``-``, a number times a query, and :meth:`images` (an average).

    Built from parts, or from ``(weight, modality, value)`` tuples:
    ``Query([(1, "text", "a dog"), (-0.5, "text", "grass")])``.
    """

    parts: tuple[QueryPart, ...]

    def __post_init__(self) -> None:
        parts = tuple(part if isinstance(part, QueryPart) else QueryPart(*part) for part in self.parts)
        if not parts:
            raise InputError("a query needs at least one part")
        object.__setattr__(self, "parts", parts)

    @classmethod
    def text(cls, text: str, weight: float = 1.0) -> Query:
        """A query of one text."""
        return cls((QueryPart(weight, "text", text),))

    @classmethod
    def image(cls, image: Any, weight: float = 1.0) -> Query:
        """A query of one image (a path or a PIL image)."""
        return cls((QueryPart(weight, "image", image),))

    @classmethod
    def images(cls, images: Iterable[Any], weight: float = 1.0) -> Query:
        """The average of several images (each part weighs ``weight / len(images)``)."""
        images = list(images)
        if not images:
            raise InputError("Query.images needs at least one image")
        return cls(tuple(QueryPart(weight / len(images), "image", image) for image in images))

    @property
    def modalities(self) -> set[str]:
        """The modalities of the parts (``text``, ``image`` or both)."""
        return {part.modality for part in self.parts}

    def __add__(self, other: Query) -> Query:
        if not isinstance(other, Query):
            return NotImplemented
        return Query(self.parts + other.parts)

    def __sub__(self, other: Query) -> Query:
        if not isinstance(other, Query):
            return NotImplemented
        return self + (-1.0) * other

    def __mul__(self, factor: float) -> Query:
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            return NotImplemented
        return Query(tuple(QueryPart(part.weight * float(factor), part.modality, part.value) for part in self.parts))

    __rmul__ = __mul__

    def __neg__(self) -> Query:
        return (-1.0) * self

    def describe(self) -> str:
        """The query as text, e.g. ``a dog + in the snow - 0.5*grass``."""
        text = ""
        for number, part in enumerate(self.parts):
            sign = "-" if part.weight < 0 else "+"
            text += (("-" if sign == "-" else "") if number == 0 else f" {sign} ") + part.describe()
        return text
