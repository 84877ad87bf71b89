"""What every query does with its search results, in one place: rank them (descending score, ties by id),
leave out excluded ids, collapse near-duplicates (``dedup``), page (``offset``) and cut (``min_score``).

A query for ``k`` hits at ``offset`` keeps hits ``offset`` to ``offset + k - 1`` of the ranked, collapsed
results (their ranks continue: page 2 of 10 holds ranks 11 to 20, the same hits as results 10..19 of a
query for 20), so pages of one query never overlap or skip a hit. Exclusions and collapsing may drop
hits: the search is then asked for more (twice as many each time) until ``offset + k`` remain or the
index has no more to give.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from retrieval.api.dedup import distinct
from retrieval.api.routes import Row, ranked
from retrieval.core.search import SearchOptions

Searcher = Callable[[int], tuple[np.ndarray, np.ndarray]]  # fetch -> (scores, positions), one row per query
DEDUP_FETCH = 3  # a collapsing query first asks for this many times the hits it keeps


def narrowed(
    index: Any,
    kind: str,
    search: Searcher,
    k: int,
    options: SearchOptions,
    drop: Sequence[Collection[str]],
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` hits of each query (one ``drop`` entry per query: ids left out of its row) as
    (scores, positions), rows padded with position -1: ``search(fetch)`` ranked, narrowed by ``options``."""
    ids = index.items(kind)["id"]
    available = int(index.manifest["counts"][kind])  # live items: no search can return more
    if available == 0:
        return _packed([[] for _ in drop])
    wanted = k + options.offset
    fetch = wanted * (DEDUP_FETCH if options.dedup is not None else 1) + max((len(d) for d in drop), default=0)
    while True:
        fetch = min(fetch, available)
        scores, positions = search(fetch)
        rows = [
            _kept(index, kind, ranked(ids, s, p), d, options.dedup)
            for s, p, d in zip(scores, positions, drop, strict=True)
        ]
        more = [  # rows still short whose search was cut at ``fetch``: a larger one may fill them
            len(row) < wanted and int((p >= 0).sum()) >= fetch for row, p in zip(rows, positions, strict=True)
        ]
        if fetch >= available or not any(more):
            break
        fetch *= 2
    cut = options.min_score
    return _packed([[pair for pair in row[options.offset : wanted] if cut is None or pair[0] >= cut] for row in rows])


def _kept(index: Any, kind: str, row: Row, drop: Collection[str], dedup: float | None) -> Row:
    if drop:
        ids = index.items(kind)["id"]
        row = [pair for pair in row if ids[pair[1]] not in drop]
    if dedup is not None:
        row = [row[i] for i in distinct(index, kind, [pos for _, pos in row], dedup)]
    return row


def _packed(rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray]:
    width = max((len(row) for row in rows), default=0)
    scores = np.full((len(rows), width), -np.inf, np.float32)
    positions = np.full((len(rows), width), -1, np.int64)
    for i, row in enumerate(rows):
        for j, (score, pos) in enumerate(row):
            scores[i, j], positions[i, j] = score, pos
    return scores, positions
