"""The linear baseline: closed-form ridge maps between the frozen image and text spaces, fitted on the anchor pairs
(LiT-style, no gradient training)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg

from retrieval.asif.projection import normalize_rows
from retrieval.asif.relative import as_matrix
from retrieval.core.atomic import atomic_path
from retrieval.core.errors import IndexFormatError, InputError

_FORMAT_VERSION = 1


_RIDGE_GRID = tuple(float(r) for r in np.logspace(-3, 2, 6))  # 1e-3 .. 1e2


_CV_FOLDS = 5


def _check_ridge(ridge: Any) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real):
        raise InputError(f"ridge must be a number > 0, got {ridge!r}")
    r = float(ridge)
    if not math.isfinite(r) or r <= 0:
        raise InputError(f"ridge must be a finite number > 0, got {ridge}")
    return r


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
    q = normalize_rows(mapped.reshape(b * n, m).copy())
    t = normalize_rows(targets.copy())
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
        i2t = as_matrix(self.image_to_text, "image_to_text map")
        t2i = as_matrix(self.text_to_image, "text_to_image map")
        if t2i.shape != i2t.shape[::-1]:
            raise InputError(f"map shapes do not match: image_to_text {i2t.shape}, text_to_image {t2i.shape}")
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
    def fit(cls, image_anchors: np.ndarray, text_anchors: np.ndarray, ridge: float | None = None) -> LinearAlignment:
        """Fit both maps on the N anchor pairs: W = argmin ||X W - Y||^2 + ridge ||W||^2.

        Solved by the normal equations (dual form when N < d). With ``ridge=None``
        the ridge is picked from 1e-3 .. 1e2 (log-spaced) by deterministic 5-fold
        cross-validation of held-out retrieval recall@1 (needs N >= 2).
        """
        x = as_matrix(image_anchors, "image anchors").astype(np.float64)
        y = as_matrix(text_anchors, "text anchors").astype(np.float64)
        if x.shape[0] != y.shape[0]:
            raise InputError(f"anchor sets differ in size: {x.shape[0]} image anchors vs {y.shape[0]} text anchors")
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
        v = as_matrix(vectors, f"{what} vectors")
        if v.shape[1] != w.shape[0]:
            raise InputError(f"{what} vectors have dimension {v.shape[1]}, the map expects {w.shape[0]}")
        return normalize_rows(v.astype(np.float64) @ w.astype(np.float64)).astype(np.float32)

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
