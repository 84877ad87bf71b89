"""Fusion: several anchor sets at once as one weighted sparse row (:func:`fuse_relative`), and reciprocal rank fusion
of several routes' rankings."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from retrieval.asif.relative import as_csr
from retrieval.core.errors import InputError


def _check_weights(weights: Sequence[float] | None, n: int, what: str) -> np.ndarray:
    """Validate per-part weights (finite, >= 0, not all 0); None means all 1."""
    if weights is None:
        return np.ones(n, dtype=np.float64)
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} weights must be numbers, got {weights!r}") from exc
    if w.ndim != 1 or w.shape[0] != n:
        raise InputError(f"expected {n} {what} weights, got {np.shape(weights)}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise InputError(f"{what} weights must be finite and >= 0, got {w.tolist()}")
    if not (w > 0).any():
        raise InputError(f"{what} weights must not all be 0")
    return w


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise InputError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def fuse_relative(parts: Sequence[sp.csr_matrix], weights: Sequence[float] | None = None) -> sp.csr_matrix:
    """Fuse relative rows of several anchor sets into one L2-normalised CSR row per item.

    Part ``i`` (n, N_i) is scaled by ``sqrt(w_i)`` and the parts are concatenated
    side by side (n, sum N_i), then rows are L2-normalised. Scoring identity:
    for fused rows f(x), f(y)::

        <f(x), f(y)> = sum_i w_i <r_i(x), r_i(y)> / (||g(x)|| ||g(y)||),
        ||g(x)||^2  = sum_i w_i ||r_i(x)||^2

    (g = the concatenation before normalisation; for ASIF rows ||r_i(x)|| is 1,
    or 0 for an empty row). ``weights`` default to equal; they must be finite,
    >= 0 and not all 0. Zero-weight parts keep their (empty) columns.
    """
    if sp.issparse(parts) or not isinstance(parts, Sequence) or len(parts) == 0:
        raise InputError("fuse_relative needs a non-empty sequence of relative-row matrices")
    mats = [as_csr(p, f"relative rows (part {i})") for i, p in enumerate(parts)]
    n = mats[0].shape[0]
    for i, m in enumerate(mats):
        if m.shape[0] != n:
            raise InputError(f"all parts need the same number of rows: part 0 has {n}, part {i} has {m.shape[0]}")
    w = _check_weights(weights, len(mats), "fusion")
    scaled = [m.astype(np.float64) * math.sqrt(wi) for m, wi in zip(mats, w, strict=True)]
    fused = sp.hstack(scaled, format="csr", dtype=np.float64)
    fused.eliminate_zeros()
    norms = np.sqrt(np.asarray(fused.multiply(fused).sum(axis=1)).ravel())
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    out = sp.csr_matrix(sp.diags(inv) @ fused, dtype=np.float32)
    out.sort_indices()
    return out


def reciprocal_rank_fusion(
    rankings: Sequence[np.ndarray],
    k: int,
    constant: float = 60.0,
    weights: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal rank fusion of several routes' rankings over one collection.

    ``rankings[i]`` is a (q, m_i) integer array of positions, best first, -1 for
    padding; the rank of a position is its column index (a position repeated in
    one row counts once, at its best rank). Score of a position:
    ``sum_i w_i / (constant + rank_i + 1)`` over the routes where it appears;
    routes with weight 0 are ignored. Returns ``(scores (q, k') float32,
    positions (q, k') int64)``, best first, ties broken by lower position, with
    ``k' = min(k, most distinct positions any query has)``; a query with fewer
    is padded with position -1 and score 0.0.
    """
    kk = _check_k(k)
    c = _check_constant(constant)
    arrays = _check_rankings(rankings)
    w = _check_weights(weights, len(arrays), "route")
    q_all, p_all, c_all = _contributions(arrays, w, c)
    g_q, g_p, g_score = _sum_by_query_and_position(q_all, p_all, c_all)
    return _best_per_query(g_q, g_p, g_score, arrays[0].shape[0], kk)


def _check_constant(constant: Any) -> float:
    if isinstance(constant, bool) or not isinstance(constant, numbers.Real):
        raise InputError(f"RRF constant must be a number >= 0, got {constant!r}")
    c = float(constant)
    if not math.isfinite(c) or c < 0:
        raise InputError(f"RRF constant must be a finite number >= 0, got {constant}")
    return c


def _check_rankings(rankings: Any) -> list[np.ndarray]:
    """The rankings as int64 arrays of one query count (positions >= 0, -1 padding)."""
    if isinstance(rankings, np.ndarray) or not isinstance(rankings, Sequence) or not rankings:
        raise InputError("reciprocal_rank_fusion needs a non-empty sequence of ranking arrays")
    arrays = []
    for i, r in enumerate(rankings):
        a = np.asarray(r)
        if a.ndim != 2 or (a.dtype.kind not in "iu" and a.size):
            raise InputError(f"ranking {i} must be a 2-D integer array, got {a.dtype} {a.shape}")
        a = a.astype(np.int64)
        if (a < -1).any():
            raise InputError(f"ranking {i} has negative positions other than the -1 padding")
        arrays.append(a)
    for i, a in enumerate(arrays):
        if a.shape[0] != arrays[0].shape[0]:
            raise InputError(f"ranking 0 has {arrays[0].shape[0]} queries but ranking {i} has {a.shape[0]}")
    return arrays


def _contributions(arrays: Sequence[np.ndarray], w: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (query, position, contribution) entry per hit, routes in order (sums then accumulate in route order)."""
    qs, ps, cs = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float64)]
    for a, wi in zip(arrays, w, strict=True):
        if wi == 0 or a.size == 0:
            continue
        q_idx, col = np.nonzero(a >= 0)  # row-major: per query, best rank first
        pos = a[q_idx, col]
        # keep the first (best-ranked) occurrence of a position within one row
        order = np.lexsort((col, pos, q_idx))
        first = np.ones(order.size, dtype=bool)
        first[1:] = (q_idx[order][1:] != q_idx[order][:-1]) | (pos[order][1:] != pos[order][:-1])
        keep = np.sort(order[first])
        qs.append(q_idx[keep])
        ps.append(pos[keep])
        cs.append(wi / (c + col[keep].astype(np.float64) + 1.0))
    return np.concatenate(qs), np.concatenate(ps), np.concatenate(cs)


def _sum_by_query_and_position(
    q_all: np.ndarray, p_all: np.ndarray, c_all: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query, position, summed score) of each distinct (query, position); sums add in input order."""
    order = np.lexsort((p_all, q_all))
    qo, po = q_all[order], p_all[order]
    new = np.ones(order.size, dtype=bool)
    new[1:] = (qo[1:] != qo[:-1]) | (po[1:] != po[:-1])
    g_inv = np.empty(order.size, dtype=np.int64)
    g_inv[order] = np.cumsum(new) - 1  # group of each entry in its original (route) order
    g_score = np.bincount(g_inv, weights=c_all, minlength=int(new.sum()))
    return qo[new], po[new], g_score


def _best_per_query(
    g_q: np.ndarray, g_p: np.ndarray, g_score: np.ndarray, n_q: int, kk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``kk`` per query by descending score, then ascending position; -1 / 0.0 padding."""
    counts = np.bincount(g_q, minlength=n_q) if n_q else np.zeros(0, dtype=np.int64)
    width = min(kk, int(counts.max()) if counts.size else 0)
    scores = np.zeros((n_q, width), dtype=np.float32)
    positions = np.full((n_q, width), -1, dtype=np.int64)
    if width == 0:
        return scores, positions
    rank_order = np.lexsort((g_p, -g_score, g_q))
    rq = g_q[rank_order]
    starts = np.zeros(n_q + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    slot = np.arange(rank_order.size) - starts[rq]
    take = slot < width
    scores[rq[take], slot[take]] = g_score[rank_order][take]
    positions[rq[take], slot[take]] = g_p[rank_order][take]
    return scores, positions
