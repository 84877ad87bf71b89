"""Typed search results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageHit:
    """An image found for a query."""

    rank: int
    score: float
    id: str
    uri: str
    width: int
    height: int
    kind: str = "image"
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)  # the source's own fields (e.g. url), if any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CaptionHit:
    """A caption found for a query; ``image_uri`` is its paired image when it came from a pairs file."""

    rank: int
    score: float
    id: str
    caption: str
    source: str
    image_uri: str | None = None
    kind: str = "caption"
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)  # the source's own fields (e.g. url), if any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
