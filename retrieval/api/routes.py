"""The four queries an index answers, the routes each one can take, and how search results become hits.

=================  =====================  ===========================================
query              CLIP index             ASIF index
=================  =====================  ===========================================
text -> image      ``clip``               ``asif`` (anchors), ``projected``
image -> caption   ``clip``               ``asif`` (anchors), ``projected``
image -> image     ``clip``               ``unimodal`` (the image encoder's own space)
text -> caption    ``clip``               ``unimodal`` (the text encoder's own space)
=================  =====================  ===========================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.core.errors import InputError
from retrieval.core.hits import CaptionHit, ImageHit
from retrieval.store.item_metadata import metadata_at

QUERIES: dict[str, tuple[str, str]] = {  # query name -> (query modality, kind of the items searched)
    "text_to_image": ("text", "image"),
    "image_to_caption": ("image", "caption"),
    "image_to_image": ("image", "image"),
    "text_to_caption": ("text", "caption"),
}
MODALITY = {"image": "image", "caption": "text"}  # the modality each kind of item is encoded in
UNIMODAL = "unimodal"  # an ASIF index's same-modality route: the unimodal encoder's own space


def query_name(query_modality: str, kind: str) -> str:
    """The name of the query (``text_to_image``, ...) that searches ``kind`` items with ``query_modality`` vectors."""
    for name, pair in QUERIES.items():
        if pair == (query_modality, kind):
            return name
    raise InputError(f"no query searches {kind}s with {query_modality} vectors (modality must be 'image' or 'text')")


def cross_modal_routes(manifest: Mapping[str, Any]) -> list[str]:
    """Routes of text -> image and image -> caption: ``clip``, or ``asif`` (the default) and ``projected``."""
    return list(manifest.get("routes") or (["clip"] if manifest["mode"] == "clip" else ["asif"]))


def routes_for(manifest: Mapping[str, Any], query: str) -> list[str]:
    """The routes ``query`` (a key of :data:`QUERIES`) can take in an index with this manifest, default first."""
    modality, kind = QUERIES[query]
    if MODALITY[kind] != modality:
        return cross_modal_routes(manifest)
    return ["clip"] if manifest["mode"] == "clip" else [UNIMODAL]


def choose_route(where: Path, manifest: Mapping[str, Any], query: str, route: str | None) -> str:
    """``route``, checked against the routes of ``query``; None picks the default."""
    return pick_route(where, routes_for(manifest, query), route, query.replace("_to_", " -> "))


def pick_route(where: Path | str, available: Sequence[str], route: str | None, what: str) -> str:
    """``route`` if it is one of ``available`` (the routes of ``what``, e.g. ``text -> image``), the first for None."""
    if route is None:
        return available[0]
    if route not in available:
        raise InputError(
            f"{where}: route {route!r} not available; {what} in this index answers by {', '.join(available)}"
        )
    return route


def check_texts(texts: Sequence[str]) -> None:
    """Every query text is a non-empty string."""
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise InputError("the query text is empty")


def image_id(image: Any) -> str | None:
    """The index id an image query would have if it were indexed (None for a PIL image: it has no path)."""
    from retrieval.sources.items import ImageRef

    if isinstance(image, (str, Path)):
        return ImageRef(path=Path(image).resolve(), source="query").id
    return None


Row = list[tuple[float, int]]  # (score, position) pairs of one query's results, best first


def live(scores: np.ndarray, positions: np.ndarray) -> Row:
    """(score, position) pairs of one result row, padding (position -1) dropped."""
    return [(float(score), int(pos)) for score, pos in zip(scores, positions, strict=True) if pos >= 0]


def ranked(ids: Sequence[str], scores: np.ndarray, positions: np.ndarray) -> Row:
    """One result row's live pairs by descending score, ties by id (stable whatever order the search gave)."""
    return sorted(live(scores, positions), key=lambda pair: (-pair[0], ids[pair[1]]))


def image_hits(
    table: Mapping[str, list[Any]], scores: np.ndarray, positions: np.ndarray, first: int = 1
) -> list[list[ImageHit]]:
    """One list of image hits per result row, ranked (see :func:`ranked`) from rank ``first``."""
    return [
        [
            ImageHit(
                rank=rank,
                score=score,
                id=table["id"][pos],
                uri=table["uri"][pos],
                width=int(table["width"][pos]),
                height=int(table["height"][pos]),
                metadata=metadata_at(table, pos),
            )
            for rank, (score, pos) in enumerate(ranked(table["id"], row_scores, row_positions), first)
        ]
        for row_scores, row_positions in zip(scores, positions, strict=True)
    ]


def caption_hits(
    table: Mapping[str, list[Any]], scores: np.ndarray, positions: np.ndarray, first: int = 1
) -> list[list[CaptionHit]]:
    """One list of caption hits per result row, ranked (see :func:`ranked`) from rank ``first``."""
    return [
        [
            CaptionHit(
                rank=rank,
                score=score,
                id=table["id"][pos],
                caption=table["caption"][pos],
                source=table["source"][pos],
                image_uri=table["image_uri"][pos],
                metadata=metadata_at(table, pos),
            )
            for rank, (score, pos) in enumerate(ranked(table["id"], row_scores, row_positions), first)
        ]
        for row_scores, row_positions in zip(scores, positions, strict=True)
    ]


def hits_of(kind: str) -> Any:
    """:func:`image_hits` or :func:`caption_hits`, by the kind of the items."""
    return image_hits if kind == "image" else caption_hits
