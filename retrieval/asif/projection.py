"""Extra cross-modal routes on top of ASIF anchors, and a linear baseline.

- :func:`project_to_modality` — the dense projected ASIF route: relative weights
  over the N anchors times the *other* modality's anchor embeddings give a vector
  in that encoder's own space.
- :func:`fuse_relative` — several anchor sets at once, as one weighted sparse row.
- :func:`reciprocal_rank_fusion` — merge the rankings of several routes.
- :class:`LinearAlignment` — closed-form ridge maps between the frozen image and
  text spaces, fitted on the anchor pairs (a LiT-style baseline with no gradient
  training).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from retrieval.core.atomic import atomic_path
from retrieval.core.errors import IndexFormatError, InputError
from retrieval.asif.relative import _as_csr, _as_matrix

_FORMAT_VERSION = 1
_RIDGE_GRID = tuple(float(r) for r in np.logspace(-3, 2, 6))  # 1e-3 .. 1e2
_CV_FOLDS = 5


# --------------------------------------------------------------------------- helpers


def _normalize_rows(m: np.ndarray) -> np.ndarray:
    """L2-normalise the rows of a float array in place; all-zero rows stay zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", m, m))
    nz = norms > 0
    m[nz] /= norms[nz, None]
    return m


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


def _check_ridge(ridge: Any) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real):
        raise InputError(f"ridge must be a number > 0, got {ridge!r}")
    r = float(ridge)
    if not math.isfinite(r) or r <= 0:
        raise InputError(f"ridge must be a finite number > 0, got {ridge}")
    return r


# --------------------------------------------------------------------------- projected ASIF route


def project_to_modality(relative_rows: sp.csr_matrix, target_anchors: np.ndarray) -> np.ndarray:
    """Dense projected ASIF route: ``relative_rows @ target_anchors``, rows L2-normalised.

    ``relative_rows`` (n, N) are relative rows computed against one modality's
    anchors; ``target_anchors`` (N, d) are the *other* modality's anchor
    embeddings. The result (n, d) float32 lives in the target encoder's space and
    is comparable by inner product with that encoder's normalised vectors.
    All-zero rows stay zero.
    """
    rows = _as_csr(relative_rows, "relative rows")
    anchors = _as_matrix(target_anchors, "target anchors")
    if rows.shape[1] != anchors.shape[0]:
        raise InputError(
            f"relative rows have {rows.shape[1]} anchor columns but there are"
            f" {anchors.shape[0]} target anchors"
        )
    out = np.asarray(rows.astype(np.float64) @ anchors.astype(np.float64))
    return _normalize_rows(out).astype(np.float32)


# --------------------------------------------------------------------------- several anchor sets


def fuse_relative(
    parts: Sequence[sp.csr_matrix], weights: Sequence[float] | None = None
) -> sp.csr_matrix:
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
    mats = [_as_csr(p, f"relative rows (part {i})") for i, p in enumerate(parts)]
    n = mats[0].shape[0]
    for i, m in enumerate(mats):
        if m.shape[0] != n:
            raise InputError(
                f"all parts need the same number of rows: part 0 has {n}, part {i} has {m.shape[0]}"
            )
    w = _check_weights(weights, len(mats), "fusion")
    scaled = [m.astype(np.float64) * math.sqrt(wi) for m, wi in zip(mats, w)]
    fused = sp.hstack(scaled, format="csr", dtype=np.float64)
    fused.eliminate_zeros()
    norms = np.sqrt(np.asarray(fused.multiply(fused).sum(axis=1)).ravel())
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    out = sp.csr_matrix(sp.diags(inv) @ fused, dtype=np.float32)
    out.sort_indices()
    return out


# --------------------------------------------------------------------------- rank fusion


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
    if isinstance(constant, bool) or not isinstance(constant, numbers.Real):
        raise InputError(f"RRF constant must be a number >= 0, got {constant!r}")
    c = float(constant)
    if not math.isfinite(c) or c < 0:
        raise InputError(f"RRF constant must be a finite number >= 0, got {constant}")
    if isinstance(rankings, np.ndarray) or not isinstance(rankings, Sequence) or not rankings:
        raise InputError("reciprocal_rank_fusion needs a non-empty sequence of ranking arrays")
    w = _check_weights(weights, len(rankings), "route")
    arrays = []
    for i, r in enumerate(rankings):
        a = np.asarray(r)
        if a.ndim != 2 or (a.dtype.kind not in "iu" and a.size):
            raise InputError(f"ranking {i} must be a 2-D integer array, got {a.dtype} {a.shape}")
        a = a.astype(np.int64)
        if (a < -1).any():
            raise InputError(f"ranking {i} has negative positions other than the -1 padding")
        arrays.append(a)
    n_q = arrays[0].shape[0]
    for i, a in enumerate(arrays):
        if a.shape[0] != n_q:
            raise InputError(f"ranking 0 has {n_q} queries but ranking {i} has {a.shape[0]}")

    # One (query, position, contribution) entry per hit, routes in order so that
    # sums accumulate in route order (bincount adds in input order).
    qs, ps, cs = [], [], []
    for a, wi in zip(arrays, w):
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
    if qs:
        q_all, p_all, c_all = np.concatenate(qs), np.concatenate(ps), np.concatenate(cs)
    else:
        q_all = p_all = np.zeros(0, dtype=np.int64)
        c_all = np.zeros(0, dtype=np.float64)

    # group by (query, position)
    order = np.lexsort((p_all, q_all))
    qo, po = q_all[order], p_all[order]
    new = np.ones(order.size, dtype=bool)
    new[1:] = (qo[1:] != qo[:-1]) | (po[1:] != po[:-1])
    group = np.cumsum(new) - 1
    g_inv = np.empty(order.size, dtype=np.int64)
    g_inv[order] = group  # group of each entry in its original (route) order
    n_groups = int(new.sum())
    g_score = np.bincount(g_inv, weights=c_all, minlength=n_groups)
    g_q, g_p = qo[new], po[new]

    counts = np.bincount(g_q, minlength=n_q) if n_q else np.zeros(0, dtype=np.int64)
    width = min(kk, int(counts.max()) if counts.size else 0)
    scores = np.zeros((n_q, width), dtype=np.float32)
    positions = np.full((n_q, width), -1, dtype=np.int64)
    if width == 0:
        return scores, positions
    # per query: descending score, then ascending position
    rank_order = np.lexsort((g_p, -g_score, g_q))
    rq = g_q[rank_order]
    starts = np.zeros(n_q + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    slot = np.arange(rank_order.size) - starts[rq]
    take = slot < width
    scores[rq[take], slot[take]] = g_score[rank_order][take]
    positions[rq[take], slot[take]] = g_p[rank_order][take]
    return scores, positions


# --------------------------------------------------------------------------- linear baseline


def _ridge_solve(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W ||x W - y||^2 + ridge ||W||^2 (float64), primal or dual form, whichever is smaller."""
    n, d = x.shape
    if n < d:  # dual: W = x^T (x x^T + r I)^-1 y
        gram = x @ x.T
        gram[np.diag_indices(n)] += ridge
        return x.T @ scipy.linalg.solve(gram, y, assume_a="pos")
    gram = x.T @ x  # primal: W = (x^T x + r I)^-1 x^T y
    gram[np.diag_indices(d)] += ridge
    return scipy.linalg.solve(gram, x.T @ y, assume_a="pos")


def _recall_mrr(mapped: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall@1, mean reciprocal rank) per batch b of row i of ``mapped[b]`` finding ``targets[i]``.

    ``mapped`` is (B, n, m), ``targets`` (n, m); similarity is cosine; tied
    candidates count as ranked above the true one (pessimistic).
    """
    b, n, m = mapped.shape
    q = _normalize_rows(mapped.reshape(b * n, m).copy())
    t = _normalize_rows(targets.copy())
    s = (q @ t.T).reshape(b, n, n)
    true = s[:, np.arange(n), np.arange(n)]
    rank = (s >= true[:, :, None]).sum(axis=2) - 1
    return (rank == 0).mean(axis=1), (1.0 / (rank + 1.0)).mean(axis=1)


def _cv_ridge(x: np.ndarray, y: np.ndarray, grid: Sequence[float], folds: int) -> float:
    """Ridge from ``grid`` with the best k-fold held-out retrieval (both directions summed).

    Folds are fixed (item i in fold i mod ``folds``). Each fold and direction
    eigendecomposes its Gram matrix once (primal or dual, whichever is smaller),
    which gives the ridge solution for every grid value at the cost of a few
    matrix products: mapped(r) = P diag(1 / (s + r)) Q. Ranking: recall@1, then
    mean reciprocal rank, then the larger ridge.
    """
    ridges = np.asarray(grid, dtype=np.float64)
    fold = np.arange(x.shape[0]) % folds
    r1 = np.zeros(ridges.size)
    mrr = np.zeros(ridges.size)
    for f in range(folds):
        tr, te = fold != f, fold == f
        for src, dst in ((x, y), (y, x)):
            s_tr, d_tr, s_te = src[tr], dst[tr], src[te]
            if s_tr.shape[0] < s_tr.shape[1]:  # dual
                evals, vecs = np.linalg.eigh(s_tr @ s_tr.T)
                p_mat, q_mat = (s_te @ s_tr.T) @ vecs, vecs.T @ d_tr
            else:  # primal
                evals, vecs = np.linalg.eigh(s_tr.T @ s_tr)
                p_mat, q_mat = s_te @ vecs, vecs.T @ (s_tr.T @ d_tr)
            scale = 1.0 / (np.maximum(evals, 0.0)[None, :] + ridges[:, None])  # (R, e)
            stacked = p_mat[None, :, :] * scale[:, None, :]  # (R, n_te, e)
            mapped = (stacked.reshape(-1, p_mat.shape[1]) @ q_mat).reshape(ridges.size, -1, dst.shape[1])
            a, b = _recall_mrr(mapped, dst[te])
            r1 += a
            mrr += b
    best = max(range(ridges.size), key=lambda i: (r1[i], mrr[i], ridges[i]))
    return float(ridges[best])


@dataclass
class LinearAlignment:
    """A trained-in-seconds baseline (LiT-style, no gradient training): linear maps between
    the frozen image and text spaces fitted on the anchor pairs by closed-form ridge regression."""

    image_to_text: np.ndarray  # (d_img, d_txt)
    text_to_image: np.ndarray  # (d_txt, d_img)
    ridge: float

    def __post_init__(self) -> None:
        i2t = _as_matrix(self.image_to_text, "image_to_text map")
        t2i = _as_matrix(self.text_to_image, "text_to_image map")
        if t2i.shape != i2t.shape[::-1]:
            raise InputError(
                f"map shapes do not match: image_to_text {i2t.shape}, text_to_image {t2i.shape}"
            )
        self.image_to_text = i2t
        self.text_to_image = t2i
        self.ridge = _check_ridge(self.ridge)

    @property
    def image_dim(self) -> int:
        """Image encoder dimension d_img."""
        return self.image_to_text.shape[0]

    @property
    def text_dim(self) -> int:
        """Text encoder dimension d_txt."""
        return self.image_to_text.shape[1]

    @classmethod
    def fit(
        cls, image_anchors: np.ndarray, text_anchors: np.ndarray, ridge: float | None = None
    ) -> LinearAlignment:
        """Fit both maps on the N anchor pairs: W = argmin ||X W - Y||^2 + ridge ||W||^2.

        Solved by the normal equations (dual form when N < d). With ``ridge=None``
        the ridge is picked from 1e-3 .. 1e2 (log-spaced) by deterministic 5-fold
        cross-validation of held-out retrieval recall@1 (needs N >= 2).
        """
        x = _as_matrix(image_anchors, "image anchors").astype(np.float64)
        y = _as_matrix(text_anchors, "text anchors").astype(np.float64)
        if x.shape[0] != y.shape[0]:
            raise InputError(
                f"anchor sets differ in size: {x.shape[0]} image anchors vs {y.shape[0]} text anchors"
            )
        n = x.shape[0]
        if n == 0:
            raise InputError("anchor set is empty")
        if ridge is None:
            if n < 2:
                raise InputError("choosing the ridge by cross-validation needs at least 2 anchor pairs")
            r = _cv_ridge(x, y, _RIDGE_GRID, min(_CV_FOLDS, n))
        else:
            r = _check_ridge(ridge)
        return cls(
            image_to_text=_ridge_solve(x, y, r).astype(np.float32),
            text_to_image=_ridge_solve(y, x, r).astype(np.float32),
            ridge=r,
        )

    def _map(self, vectors: np.ndarray, w: np.ndarray, what: str) -> np.ndarray:
        v = _as_matrix(vectors, f"{what} vectors")
        if v.shape[1] != w.shape[0]:
            raise InputError(f"{what} vectors have dimension {v.shape[1]}, the map expects {w.shape[0]}")
        return _normalize_rows(v.astype(np.float64) @ w.astype(np.float64)).astype(np.float32)

    def map_images(self, vectors: np.ndarray) -> np.ndarray:
        """Image vectors (n, d_img) -> text space (n, d_txt), rows L2-normalised."""
        return self._map(vectors, self.image_to_text, "image")

    def map_texts(self, vectors: np.ndarray) -> np.ndarray:
        """Text vectors (n, d_txt) -> image space (n, d_img), rows L2-normalised."""
        return self._map(vectors, self.text_to_image, "text")

    def save(self, path: Path) -> None:
        """Write the maps to ``path`` (.npz, no pickle) atomically."""
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                format_version=np.int64(_FORMAT_VERSION),
                image_to_text=self.image_to_text,
                text_to_image=self.text_to_image,
                ridge=np.float64(self.ridge),
            )

    @classmethod
    def load(cls, path: Path) -> LinearAlignment:
        """Read maps written by :meth:`save`; a missing or corrupt file raises IndexFormatError."""
        path = Path(path)
        if not path.is_file():
            raise IndexFormatError(f"{path}: linear-alignment file not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                version = int(data["format_version"])
                if version != _FORMAT_VERSION:
                    raise ValueError(f"format version {version}, expected {_FORMAT_VERSION}")
                i2t = np.array(data["image_to_text"])
                t2i = np.array(data["text_to_image"])
                ridge = data["ridge"]
                if ridge.shape != ():
                    raise ValueError(f"ridge must be a scalar, got shape {ridge.shape}")
                return cls(image_to_text=i2t, text_to_image=t2i, ridge=float(ridge))
        except Exception as exc:  # zip, npy header, missing keys, bad shapes alike
            raise IndexFormatError(
                f"{path}: not a readable linear-alignment file ({type(exc).__name__}: {exc})"
            ) from exc
