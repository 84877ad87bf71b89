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
    available = routes_for(manifest, query)
    if route is None:
        return available[0]
    if route not in available:
        what = query.replace("_to_", " -> ")
        raise InputError(
            f"{where}: route {route!r} not available; {what} in this index answers by {', '.join(available)}"
        )
    return route


def check_k(k: int) -> None:
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")


def check_texts(texts: Sequence[str], k: int) -> None:
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise InputError("the query text is empty")
    check_k(k)


def image_id(image: Any) -> str | None:
    """The index id an image query would have if it were indexed (None for a PIL image: it has no path)."""
    from retrieval.sources.items import ImageRef

    if isinstance(image, (str, Path)):
        return ImageRef(path=Path(image).resolve(), source="query").id
    return None


def live(scores: np.ndarray, positions: np.ndarray) -> list[tuple[float, int]]:
    """(score, position) pairs of one result row, padding (-1) dropped."""
    return [(float(score), int(pos)) for score, pos in zip(scores, positions, strict=True) if pos >= 0]


def _ranked(
    table: Mapping[str, list], scores: np.ndarray, positions: np.ndarray, drop: str | None, k: int | None
) -> list[tuple[float, int]]:
    pairs = sorted(live(scores, positions), key=lambda pair: (-pair[0], table["id"][pair[1]]))  # ties: by id, stably
    if drop is not None:
        pairs = [(score, pos) for score, pos in pairs if table["id"][pos] != drop]
    return pairs[:k] if k is not None else pairs


def image_hits(
    table: Mapping[str, list],
    scores: np.ndarray,
    positions: np.ndarray,
    drop: Sequence[str | None] | None = None,
    k: int | None = None,
) -> list[list[ImageHit]]:
    """One list of image hits per result row; ``drop[row]`` names an id left out of that row, ``k`` caps each."""
    return [
        [
            ImageHit(
                rank=rank + 1,
                score=score,
                id=table["id"][pos],
                uri=table["uri"][pos],
                width=int(table["width"][pos]),
                height=int(table["height"][pos]),
                metadata=metadata_at(table, pos),
            )
            for rank, (score, pos) in enumerate(
                _ranked(table, row_scores, row_positions, drop[row] if drop else None, k)
            )
        ]
        for row, (row_scores, row_positions) in enumerate(zip(scores, positions, strict=True))
    ]


def caption_hits(table: Mapping[str, list], scores: np.ndarray, positions: np.ndarray) -> list[list[CaptionHit]]:
    """One list of caption hits per result row."""
    return [
        [
            CaptionHit(
                rank=rank + 1,
                score=score,
                id=table["id"][pos],
                caption=table["caption"][pos],
                source=table["source"][pos],
                image_uri=table["image_uri"][pos],
                metadata=metadata_at(table, pos),
            )
            for rank, (score, pos) in enumerate(_ranked(table, row_scores, row_positions, None, None))
        ]
        for row_scores, row_positions in zip(scores, positions, strict=True)
    ]
