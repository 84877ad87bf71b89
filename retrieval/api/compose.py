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

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from retrieval.api.routes import (
    MODALITY,
    UNIMODAL,
    cross_modal_routes,
    hits_of,
    pick_route,
    query_name,
    routes_for,
)
from retrieval.core.errors import InputError
from retrieval.core.query import Query
from retrieval.core.search import SearchOptions, check_k, options_or_default
from retrieval.index.dedup import unit_rows

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
    index: Any, query: Query, target: str, k: int, options: SearchOptions | None, exclude: Collection[str] = ()
) -> list[Any]:
    """The ``k`` best ``target`` hits for ``query``, narrowed by ``options`` (see :mod:`retrieval.api.paging`);
    ``exclude``: item ids left out."""
    if not isinstance(query, Query):
        raise InputError(f"search takes a Query (e.g. Query.text('a dog')), got {type(query).__name__}")
    k, options = check_k(k), options_or_default(options)
    route = pick_route(
        index.path, query_routes(index.manifest, query, target), options.route, f"this query of {target}s"
    )
    if index.manifest["counts"][target] == 0:
        raise InputError(f"{index.path}: the index holds no {target}s; rebuild it with some")
    rows = query_rows(index, query, target, route)
    scores, positions = index.search_rows(target, rows, k, options.replace(route=route), exclude=exclude)
    hits: list[Any] = hits_of(target)(index.items(target), scores, positions, options.offset + 1)[0]
    return hits
