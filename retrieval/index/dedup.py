"""Near-duplicates among unit vectors: greedy collapse of a ranked list, and groups by range search.

Two vectors are near-duplicates when their inner product (cosine, for unit rows) is at least a
threshold. One rule everywhere: a ranked list keeps a row unless it is a near-duplicate of a row
already kept (so the better-ranked copy stays); groups join every pair of near-duplicates
(connected components, so chains of pairs form one group).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np

from retrieval.core.errors import InputError

RANGE_BLOCK = 4096  # query rows per range search


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float in (0, 1]; a clear error otherwise."""
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not math.isfinite(float(threshold))
        or not 0 < threshold <= 1
    ):
        raise InputError(f"the near-duplicate threshold must be a number in (0, 1], got {threshold!r}")
    return float(threshold)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 copy of ``vectors`` with rows L2-normalised (all-zero rows stay zero)."""
    out = np.array(vectors, dtype=np.float32, copy=True, ndmin=2)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def greedy_keep(vectors: np.ndarray, threshold: float) -> list[int]:
    """Rows of a ranked list (best first) to keep: each row unless its cosine to a kept row is >= ``threshold``."""
    threshold = check_threshold(threshold)
    rows = unit_rows(vectors) if len(vectors) else np.zeros((0, 1), np.float32)
    kept: list[int] = []
    for row in range(len(rows)):
        if not kept or float(np.max(rows[kept] @ rows[row])) < threshold:
            kept.append(row)
    return kept


def near_duplicate_pairs(
    take: Callable[[int, int], np.ndarray], n: int, threshold: float, block: int = RANGE_BLOCK
) -> np.ndarray:
    """Pairs (i, j), i < j, of the ``n`` rows whose cosine is >= ``threshold``: an (m, 2) int64 array.

    ``take(start, stop)`` returns rows ``start:stop`` (so a memory-mapped store is read a block at a
    time). Exact: FAISS range search of each block against every block from it on, by inner product.
    """
    import faiss

    threshold = check_threshold(threshold)
    found = [np.zeros((0, 2), np.int64)]
    for start in range(0, n, block):
        queries = unit_rows(take(start, min(start + block, n)))
        for base in range(start, n, block):
            rows = queries if base == start else unit_rows(take(base, min(base + block, n)))
            index = faiss.IndexFlatIP(rows.shape[1])
            index.add(rows)
            # range_search keeps scores > radius: step just below the threshold so ties count
            lims, _, labels = index.range_search(queries, float(np.nextafter(np.float32(threshold), np.float32(-1))))
            counts = np.diff(lims).astype(np.int64)
            left = np.repeat(np.arange(start, start + len(queries), dtype=np.int64), counts)
            right = labels.astype(np.int64) + base
            keep = left < right
            found.append(np.stack([left[keep], right[keep]], axis=1))
    return np.concatenate(found)


def groups_of(pairs: np.ndarray, n: int) -> list[list[int]]:
    """Connected components (of two or more rows) of the graph of ``pairs`` over rows 0..n-1, each sorted,
    ordered by their first row (union-find)."""
    parent = np.arange(n, dtype=np.int64)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for i, j in pairs:
        a, b = root(int(i)), root(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for row in sorted({int(r) for r in pairs.ravel()}):
        members.setdefault(root(row), []).append(row)
    return sorted((rows for rows in members.values() if len(rows) > 1), key=lambda rows: rows[0])
