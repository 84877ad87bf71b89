"""The approximate sparse route's first stage: a dense low-rank sketch of the relative rows, searched with FAISS.

With few anchors (1k-10k) each anchor's posting list holds a sizeable share of a large
collection, so the exact route reads millions of entries per query. The sketch projects every
row onto the top ``dim`` right singular vectors of a sample of the rows (a PCA without centring:
inner products are what the route ranks by), holds the projected rows in an exact FAISS
inner-product index, and hands the best few hundred candidates to exact rescoring on the
posting lists (:meth:`retrieval.asif.postings.PostingLists.scores_at`). Only the candidates'
order can be wrong, never their scores. It is built in memory on first use; nothing is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from retrieval.asif.postings import PostingLists

SKETCH_DIM = 64  # recall@10 0.97 with 300 candidates at 100k rows x 1k anchors, 0.68 at 1M: benchmarks/ASIF_SCALE.md
SAMPLE_ROWS = 20_000  # rows the basis is fitted on
_PROJECT_COLUMNS = 8192  # anchors per step when projecting the rows (bounds the float32 copy)


def _basis(lists: PostingLists, dim: int, seed: int) -> np.ndarray:
    """(N, dim') orthonormal basis: the top right singular vectors of a row sample (identity when N <= dim)."""
    n, n_anchors = lists.n_rows, lists.n_anchors
    if n_anchors <= dim:
        return np.eye(n_anchors, dtype=np.float32)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, SAMPLE_ROWS), replace=False))
    m = sp.csc_matrix(
        (np.asarray(lists.values, dtype=np.float64), np.asarray(lists.rows), np.asarray(lists.indptr)),
        shape=(n, n_anchors),
    )[sample]
    return _top_right_singular_vectors(m, min(dim, *m.shape), rng)


def _top_right_singular_vectors(m: sp.csc_matrix, rank: int, rng: np.random.Generator, power: int = 2) -> np.ndarray:
    """(N, rank) float32: randomised SVD (Halko et al.) with ``power`` power iterations, seeded by ``rng``."""
    width = min(rank + 10, *m.shape)
    y = m @ rng.standard_normal((m.shape[1], width))
    for _ in range(power):
        y = m @ (m.T @ _orthonormal(y))
    basis = _orthonormal(y)
    _, _, vt = np.linalg.svd(np.asarray((m.T @ basis).T), full_matrices=False)
    return np.ascontiguousarray(vt[:rank].T, dtype=np.float32)


def _orthonormal(y: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the columns of a tall ``y`` (eigen-decomposition of its small Gram matrix)."""
    evals, evecs = np.linalg.eigh(y.T @ y)
    keep = evals > evals.max() * 1e-12 if evals.size and evals.max() > 0 else np.zeros(evals.shape, bool)
    if not keep.any():
        return np.zeros((y.shape[0], 1))
    return y @ (evecs[:, keep] / np.sqrt(evals[keep]))


def _project(lists: PostingLists, basis: np.ndarray) -> np.ndarray:
    """Rows @ basis (n, dim) float32, a block of anchors at a time."""
    out = np.zeros((lists.n_rows, basis.shape[1]), dtype=np.float32)
    for start in range(0, lists.n_anchors, _PROJECT_COLUMNS):
        stop = min(start + _PROJECT_COLUMNS, lists.n_anchors)
        a, b = int(lists.indptr[start]), int(lists.indptr[stop])
        block = sp.csc_matrix(
            (
                np.asarray(lists.values[a:b], dtype=np.float32),
                np.asarray(lists.rows[a:b]),
                lists.indptr[start : stop + 1] - a,
            ),
            shape=(lists.n_rows, stop - start),
        )
        out += block @ basis[start:stop]
    return out


@dataclass(frozen=True)
class RelativeSketch:
    """Projected rows of one set of posting lists in an exact FAISS inner-product index."""

    basis: np.ndarray  # (N, dim) float32
    index: Any  # faiss.IndexFlatIP over the (n, dim) projected rows

    @classmethod
    def build(cls, lists: PostingLists, dim: int = SKETCH_DIM, seed: int = 0) -> RelativeSketch:
        """Fit the basis on a sample of the rows (deterministic for a given ``seed``) and index all rows."""
        import faiss

        basis = _basis(lists, dim, seed)
        index = faiss.IndexFlatIP(basis.shape[1])
        index.add(_project(lists, basis))
        return cls(basis, index)

    def candidates(self, cols: np.ndarray, weights: np.ndarray, count: int) -> np.ndarray:
        """Ascending row ids of the ``count`` rows whose sketches score best against one query row."""
        q = (weights.astype(np.float32)[None, :] @ self.basis[cols]).astype(np.float32)
        _, ids = self.index.search(np.ascontiguousarray(q), min(count, self.index.ntotal))
        return np.unique(ids[0][ids[0] >= 0])
