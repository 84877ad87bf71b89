"""Search restricted to a set of allowed positions (a ``where=`` filter, deletions already taken out).

The restriction is applied inside the search, never by fetching k and dropping: a query for k
gets k whenever k items are allowed. Two ways, chosen by how many pass (see benchmarks/FILTERS.md):

- few pass (at most :data:`EXACT_ROWS`, or under :data:`EXACT_SHARE` of the rows): an exact scan
  of the allowed rows' stored vectors (gathered once per filter and vector set while small enough,
  then FAISS's exact k-NN over them), ties broken by lower position;
- otherwise the index's own search with a FAISS ID selector (a bitmap) in its search parameters,
  IVF probing and HNSW breadth raised by :func:`widened` so the allowed share of the visited
  vectors still holds k good candidates; a query for which the index still finds fewer than k
  allowed rows is answered by the exact scan. Indexes that take no selector (FAISS GPU) get the
  exact scan whatever the share; the torch GPU index masks its scores before its top-k.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import numpy as np

from retrieval.core.search import SearchKnobs
from retrieval.index.source import VectorSource
from retrieval.index.torch_search import TorchFlatIndex
from retrieval.index.vector_index import Exclusions, own_knobs, search

EXACT_ROWS = 4096  # an exact scan of this many rows costs about one unfiltered ANN search (benchmarks/FILTERS.md)
EXACT_SHARE = 0.02  # and below 2% of the rows, selectors slow ANN searches down (HNSW) or miss (IVF)
CACHED_BYTES = 64 << 20  # gathered float32 rows kept per (filter, vector set) up to this size
MAX_WIDEN = 16  # the most IVF probes / HNSW breadth are multiplied by at low selectivity


def live_mask(rows: int, deleted: np.ndarray) -> np.ndarray:
    """True for each of ``rows`` positions not in ``deleted``."""
    mask = np.ones(rows, bool)
    mask[deleted] = False
    return mask


class Selection:
    """Allowed positions out of ``total`` rows: sorted array, FAISS bitmap selector, mask; with gathered rows cached."""

    def __init__(self, positions: np.ndarray, total: int) -> None:
        import faiss

        positions = np.unique(np.asarray(positions, dtype=np.int64))
        self.positions = positions[(positions >= 0) & (positions < total)]
        self.total = int(total)
        self.mask = np.zeros(self.total, bool)
        self.mask[self.positions] = True
        self._bits = np.packbits(self.mask, bitorder="little")  # FAISS reads bit i of byte i >> 3
        # faiss's Python wrapper takes the packed array alone (its stubs know only the C++ (n, bitmap) form)
        self.selector = faiss.IDSelectorBitmap(self._bits)  # type: ignore[call-arg, arg-type]
        self._rows: dict[int, tuple[VectorSource, np.ndarray]] = {}  # id(vector source) -> gathered rows
        self._excluded: Exclusions | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def share(self) -> float:
        """The allowed fraction of the rows."""
        return len(self.positions) / self.total if self.total else 0.0

    def as_exclusions(self) -> Exclusions:
        """The same restriction in the form :func:`~retrieval.index.vector_index.search` takes (rows NOT allowed)."""
        with self._lock:
            if self._excluded is None:
                self._excluded = Exclusions.outside(self.mask, self.selector)
            return self._excluded

    def rows(self, vectors: VectorSource) -> np.ndarray:
        """The allowed rows of ``vectors`` as float32, gathered once per vector set while under :data:`CACHED_BYTES`."""
        with self._lock:
            entry = self._rows.get(id(vectors))
        if entry is not None:
            return entry[1]
        gathered = vectors.take(self.positions)
        if gathered.nbytes <= CACHED_BYTES:
            with self._lock:
                self._rows[id(vectors)] = (vectors, gathered)  # the source is held: its id stays unique
        return gathered


def restrict(allowed: np.ndarray, total: int, exclude: Exclusions | None) -> Selection:
    """The :class:`Selection` of ``allowed`` positions less the deleted ones."""
    positions = np.asarray(allowed, dtype=np.int64)
    if exclude is not None and len(exclude):
        positions = positions[~exclude.mask[np.clip(positions, 0, max(len(exclude.mask) - 1, 0))]]
    return Selection(positions, total)


def exact_first(index: Any, selection: Selection) -> bool:
    """Whether ``selection`` is searched by an exact scan of its rows rather than by ``index`` with a selector."""
    if not getattr(index, "supports_selector", True) and not isinstance(index, TorchFlatIndex):
        return True
    return len(selection) <= EXACT_ROWS or selection.share < EXACT_SHARE


def widened(index: Any, knobs: SearchKnobs, share: float) -> SearchKnobs:
    """``knobs`` with IVF probes and HNSW breadth raised for a selector that lets ``share`` of the rows through.

    The square root of 1/share, capped at :data:`MAX_WIDEN`: at 10% about 3x, at 2% (the exact-scan
    border) about 7x; measured in benchmarks/filters.py to keep recall@10 at its unfiltered level.
    """
    factor = min(MAX_WIDEN, max(1.0, (1.0 / max(share, 1e-9)) ** 0.5))
    if factor <= 1.0:
        return knobs
    own = own_knobs(index)
    nprobe, ef = knobs.nprobe or own.nprobe, knobs.ef_search or own.ef_search
    return replace(
        knobs,
        nprobe=int(np.ceil(nprobe * factor)) if nprobe else knobs.nprobe,
        ef_search=int(np.ceil(ef * factor)) if ef else knobs.ef_search,
    )


def exact_scan(queries: np.ndarray, rows: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of ``rows`` (at ``positions``, sorted) by inner product: descending score, ties by lower position.

    FAISS's exact k-NN, not a numpy product: for a few queries it scores on the calling thread, where
    numpy's BLAS wakes its thread pool, whose start-up dwarfs the product itself on a busy machine.
    """
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(int(k), len(positions))
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    scores, cut = faiss.knn(queries, np.ascontiguousarray(rows, dtype=np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)
    order = np.lexsort((cut, -scores), axis=1)  # FAISS keeps the lower row of a tie; order them too
    return np.take_along_axis(scores, order, axis=1), positions[np.take_along_axis(cut, order, axis=1)]


def search_selected(
    index: Any,
    queries: np.ndarray,
    k: int,
    knobs: SearchKnobs,
    selection: Selection,
    vectors: VectorSource,
    rerank_with: VectorSource | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of the allowed rows of ``index`` (stored rows ``vectors``); returns (scores, positions) like
    :func:`~retrieval.index.vector_index.search`, -1 padding a row only when fewer than k are allowed."""
    if exact_first(index, selection):
        return exact_scan(queries, selection.rows(vectors), selection.positions, k)
    if isinstance(index, TorchFlatIndex):
        return index.search(
            np.ascontiguousarray(queries, dtype=np.float32), min(int(k), len(selection)), allowed=selection.mask
        )
    tuned = widened(index, knobs, selection.share)
    scores, positions = search(index, queries, k, tuned, selection.as_exclusions(), rerank_with)
    short = np.flatnonzero((positions < 0).any(axis=1))  # the visited lists / graph held fewer than k allowed rows
    if len(short):  # those queries get the exact scan: k hits whenever k rows are allowed
        scores[short], positions[short] = exact_scan(
            np.asarray(queries, np.float32)[short], selection.rows(vectors), selection.positions, positions.shape[1]
        )
    return scores, positions
