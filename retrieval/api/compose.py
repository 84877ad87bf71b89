"""Composed queries (:class:`~retrieval.core.query.Query`): weighted text and image parts searched as one.

Every part is encoded to a unit vector, the parts are combined as a weighted sum in one space and the
sum is renormalised (L2). The space is the route's:

=============  ================================================================================
route          space the parts are combined in
=============  ================================================================================
``clip``       the shared CLIP space (text and image parts alike)
``asif``       the anchors' relative space: each part's relative row, computed against its own
               modality's anchors (top-k, power p, L2), weighted, summed, renormalised
``projected``  the encoder space the items were projected into (text for images, image for
               captions): parts of the other modality are projected there through the anchors first
``unimodal``   the items' own encoder space (image for images, text for captions): parts of the
               other modality are projected there through the anchors (the projected route's map)
=============  ================================================================================

Routes a query may take: those of the four plain queries its parts make (a text-only query for
images: ``asif``/``projected``; an image-only one: ``unimodal``); a query mixing text and image
takes any route of the index, by default the cross-modal one (``clip`` or ``asif``), where both
modalities land without projection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from retrieval.api.dedup import distinct
from retrieval.api.routes import (
    MODALITY,
    UNIMODAL,
    caption_hits,
    check_k,
    cross_modal_routes,
    image_hits,
    query_name,
    routes_for,
)
from retrieval.core.errors import InputError
from retrieval.core.query import Query
from retrieval.index.dedup import check_threshold, unit_rows
from retrieval.index.spec import SearchKnobs

TARGETS = ("image", "caption")
OTHER = {"image": "text", "text": "image"}


def query_routes(manifest: dict[str, Any], query: Query, target: str) -> list[str]:
    """The routes ``query`` can take against ``target`` items in an index with this manifest, default first."""
    if target not in TARGETS:
        raise InputError(f"the search target must be 'image' or 'caption', got {target!r}")
    names = [query_name(modality, target) for modality in sorted(query.modalities)]
    if len(names) == 1:
        return routes_for(manifest, names[0])
    return cross_modal_routes(manifest) + ([UNIMODAL] if manifest["mode"] == "asif" else [])


def choose_query_route(index: Any, query: Query, target: str, route: str | None) -> str:
    """``route`` checked against :func:`query_routes` (None: the default)."""
    available = query_routes(index.manifest, query, target)
    if route is None:
        return available[0]
    if route not in available:
        raise InputError(
            f"{index.path}: route {route!r} not available for this query of {target}s; "
            f"it answers by {', '.join(available)}"
        )
    return route


def encoded_parts(index: Any, query: Query) -> dict[str, np.ndarray]:
    """The unit vectors of the query's parts, by modality (each in its encoder's space), in part order."""
    out = {}
    for modality in sorted(query.modalities):
        values = [part.value for part in query.parts if part.modality == modality]
        out[modality] = unit_rows(index.encode(modality, values))
    return out


def combined(rows: Sequence[Any], weights: Sequence[float]) -> Any:
    """``sum(w * row)`` renormalised (L2): one (1, d) dense or CSR row; an error when the parts cancel out."""
    total = rows[0] * weights[0]
    for row, weight in zip(rows[1:], weights[1:], strict=True):
        total = total + row * weight
    if sp.issparse(total):
        total = sp.csr_matrix(total, dtype=np.float32)
        norm = float(np.sqrt(total.multiply(total).sum()))
    else:
        total = np.asarray(total, dtype=np.float32).reshape(1, -1)
        norm = float(np.linalg.norm(total))
    if not norm > 1e-6:
        raise InputError("the query's parts cancel out: their weighted sum is zero")
    return total / norm


def query_rows(index: Any, query: Query, target: str, route: str) -> Any:
    """The composed query row in ``route``'s space (see the module docstring)."""
    vectors = encoded_parts(index, query)
    seen = {modality: 0 for modality in vectors}
    rows, weights = [], []
    if route == "clip":
        space = None
    elif route == "asif":
        space = "relative"
    else:  # projected: the other modality's encoder space; unimodal: the items' own
        space = OTHER[MODALITY[target]] if route == "projected" else MODALITY[target]
    for part in query.parts:
        vector = vectors[part.modality][seen[part.modality]][None, :]
        seen[part.modality] += 1
        if space == "relative":
            vector = index.anchor_spaces.relative(vector, part.modality, index.asif_params)
        elif space is not None and part.modality != space:
            relative = index.anchor_spaces.relative(vector, part.modality, index.asif_params)
            vector = index.anchor_spaces.project(relative, space)
        rows.append(vector)
        weights.append(part.weight)
    return combined(rows, weights)


def search_query(
    index: Any,
    query: Query,
    target: str = "image",
    k: int = 10,
    route: str | None = None,
    knobs: SearchKnobs | None = None,
    dedup: float | None = None,
    exclude: Sequence[str] = (),
    **options: Any,
) -> list[Any]:
    """The ``k`` best ``target`` hits for ``query``; ``dedup``: collapse near-duplicates at this cosine
    (fetching more so ``k`` remain when the index has them); ``exclude``: item ids left out; ``options``
    go to :meth:`~retrieval.api.engine.Index.search_rows`."""
    if not isinstance(query, Query):
        raise InputError(f"search takes a Query (e.g. Query.text('a dog')), got {type(query).__name__}")
    check_k(k)
    route = choose_query_route(index, query, target, route)
    if dedup is not None:
        dedup = check_threshold(dedup)
    if index.manifest["counts"][target] == 0:
        raise InputError(f"{index.path}: the index holds no {target}s; rebuild it with some")
    rows = query_rows(index, query, target, route)
    live, ids, drop = index.manifest["counts"][target], index.items(target)["id"], set(exclude)
    fetch = k + len(drop) if dedup is None else 3 * k + len(drop)
    while True:
        scores, positions = index.search_rows(target, route, rows, min(fetch, live), knobs, **options)
        pairs = [(s, p) for s, p in zip(scores[0], positions[0], strict=True) if p >= 0 and ids[p] not in drop]
        if dedup is not None:
            pairs = [pairs[i] for i in distinct(index, target, [p for _, p in pairs], dedup)]
        if len(pairs) >= k or fetch >= live:
            break
        fetch *= 2
    pairs = pairs[:k]
    found = (np.array([[s for s, _ in pairs]], np.float32), np.array([[p for _, p in pairs]], np.int64))
    return (image_hits if target == "image" else caption_hits)(index.items(target), *found)[0]
