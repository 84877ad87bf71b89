"""ASIF relative representations (arXiv 2210.01738).

An anchor set is N (image, caption) pairs, embedded once with a frozen image
encoder (A_img, N x d_img) and a frozen text encoder (A_txt, N x d_txt), rows
L2-normalised. A vector x of either modality becomes an N-dim "relative" row:
its inner products with the anchors of its own modality, of which only the
top-k are kept, clipped at 0, raised to the power p and L2-normalised. Rows of
both modalities then live in the same anchor space, and cross-modal similarity
is their inner product. Rows are sparse (at most k non-zeros): a collection's
rows are held as per-anchor posting lists (retrieval/asif/postings.py), so a
query reads only the lists of its k anchors.
"""

from __future__ import annotations

import math
import numbers
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from retrieval.asif.postings import (
    PostingLists,
    as_csr,
    load_csr_npz,
    top_k_row,
    top_k_scores,
)
from retrieval.asif.sketch import RelativeSketch
from retrieval.core.errors import IndexFormatError, InputError

__all__ = [
    "AnchorSpace",
    "AsifParams",
    "DEFAULT_PARAMS",
    "SparseRelativeIndex",
    "as_csr",
    "as_matrix",
    "relative_representation",
    "top_k_similarities",
]

Modality = Literal["image", "text"]


@dataclass(frozen=True)
class AsifParams:
    """ASIF sparsification parameters: keep the top-``k`` anchors, raise to ``p``.

    A field left ``None`` is not chosen: :meth:`resolved` takes it from the anchor
    set's own stored parameters (see :func:`retrieval.asif.anchors.asif_params_for`)
    or, where no anchor set is involved, from :data:`DEFAULT_PARAMS`. That is the
    only place defaults are filled in; stored parameters are always complete.
    """

    k: int | None = None
    p: float | None = None

    def __post_init__(self) -> None:
        if self.k is not None:
            if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral) or self.k < 1:
                raise InputError(f"ASIF k must be an integer >= 1, got {self.k!r}")
            object.__setattr__(self, "k", int(self.k))
        if self.p is not None:
            if isinstance(self.p, bool) or not isinstance(self.p, numbers.Real):
                raise InputError(f"ASIF p must be a number > 0, got {self.p!r}")
            if not math.isfinite(float(self.p)) or float(self.p) <= 0:
                raise InputError(f"ASIF p must be a finite number > 0, got {self.p}")
            object.__setattr__(self, "p", float(self.p))

    @property
    def complete(self) -> bool:
        """Whether both k and p are chosen."""
        return self.k is not None and self.p is not None

    def resolved(self, base: AsifParams | None = None) -> AsifParams:
        """These parameters with each open field taken from ``base`` (default :data:`DEFAULT_PARAMS`)."""
        base = base if base is not None else DEFAULT_PARAMS
        if not base.complete:
            raise InputError(f"ASIF defaults must set both k and p, got {base}")
        return AsifParams(k=self.k if self.k is not None else base.k, p=self.p if self.p is not None else base.p)

    def chosen(self, base: AsifParams | None = None) -> tuple[int, float]:
        """``(k, p)`` of :meth:`resolved`: both always set."""
        full = self.resolved(base)
        assert full.k is not None and full.p is not None  # resolved against a complete base
        return full.k, full.p

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form, e.g. for an index manifest (complete parameters only)."""
        if not self.complete:
            raise InputError(f"ASIF params to store need both k and p, got k={self.k}, p={self.p}")
        return {"k": self.k, "p": self.p}

    @classmethod
    def from_json(cls, d: Any) -> AsifParams:
        """Inverse of :meth:`to_json`; both keys are required (not null), no others allowed."""
        if not isinstance(d, dict):
            raise InputError(f"ASIF params must be a JSON object, got {type(d).__name__}")
        missing = {"k", "p"} - {key for key, value in d.items() if value is not None}
        extra = d.keys() - {"k", "p"}
        if missing or extra:
            raise InputError(
                f"ASIF params need exactly the keys 'k' and 'p'"
                f" (missing: {sorted(missing)}, unknown: {sorted(map(str, extra))})"
            )
        return cls(k=d["k"], p=d["p"])


DEFAULT_PARAMS = AsifParams(k=100, p=2.0)  # the one default, tuned on half of COCO: benchmarks/asif_params.py


# --------------------------------------------------------------------------- helpers


def as_matrix(a: np.ndarray, name: str) -> np.ndarray:
    """Validate a 2-D finite array and return it as C-contiguous float32."""
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise InputError(f"{name} must be a 2-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise InputError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return arr


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def _check_dims(vectors: np.ndarray, anchors: np.ndarray) -> None:
    if vectors.shape[1] != anchors.shape[1]:
        raise InputError(f"vectors have dimension {vectors.shape[1]} but anchors have dimension {anchors.shape[1]}")


def _flat_ip_index(anchors: np.ndarray) -> Any:
    """Exact inner-product faiss index over (validated, float32) anchors."""
    import faiss

    index = faiss.IndexFlatIP(anchors.shape[1])
    index.add(anchors)
    return index


def _search_flat(index: Any, vectors: np.ndarray, k: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k search of an exact faiss index in batches of ``batch_size`` rows."""
    n = vectors.shape[0]
    kk = min(k, index.ntotal)
    scores = np.empty((n, kk), dtype=np.float32)
    ids = np.empty((n, kk), dtype=np.int64)
    if kk == 0:
        return scores, ids
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        scores[start:stop], ids[start:stop] = index.search(vectors[start:stop], kk)
    return scores, ids


def _relative_from_topk(scores: np.ndarray, ids: np.ndarray, n_anchors: int, p: float) -> sp.csr_matrix:
    """Clip, power, L2-normalise top-k scores and scatter them into an (n, N) CSR."""
    n, kk = scores.shape
    w = np.maximum(scores.astype(np.float64), 0.0)  # clip before the power (p may be < 1)
    np.power(w, p, out=w)
    norms = np.sqrt(np.einsum("ij,ij->i", w, w))
    nz = norms > 0  # all-zero rows stay zero instead of becoming NaN
    w[nz] /= norms[nz, None]
    order = np.argsort(ids, axis=1, kind="stable")  # sorted column indices per row
    ids_sorted = np.take_along_axis(ids, order, axis=1)
    w_sorted = np.take_along_axis(w, order, axis=1).astype(np.float32)
    keep = w_sorted != 0
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    out = sp.csr_matrix((w_sorted[keep], ids_sorted[keep], indptr), shape=(n, n_anchors), dtype=np.float32)
    out.has_sorted_indices = True
    return out


# --------------------------------------------------------------------------- public functions


def top_k_similarities(
    vectors: np.ndarray, anchors: np.ndarray, k: int, batch_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products of each vector with the anchors.

    Returns ``(scores (n, k') float32, anchor_ids (n, k') int64)``, best first,
    with ``k' = min(k, N)``; the search runs in batches of ``batch_size`` rows.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise InputError(f"k must be an integer >= 1, got {k!r}")
    batch_size = _check_batch_size(batch_size)
    v = as_matrix(vectors, "vectors")
    a = as_matrix(anchors, "anchors")
    _check_dims(v, a)
    return _search_flat(_flat_ip_index(a), v, int(k), batch_size)


def relative_representation(
    vectors: np.ndarray, anchors: np.ndarray, params: AsifParams, batch_size: int = 4096
) -> sp.csr_matrix:
    """ASIF relative rows of ``vectors`` against same-modality ``anchors``.

    Returns an (n, N) float32 CSR matrix with at most ``params.k`` non-zeros per
    row (zeros after clipping dropped), sorted indices, rows L2-normalised.
    """
    k, p = params.chosen()
    scores, ids = top_k_similarities(vectors, anchors, k, batch_size)
    return _relative_from_topk(scores, ids, np.shape(anchors)[0], p)


# --------------------------------------------------------------------------- anchor space


class AnchorSpace:
    """Anchor matrices of one anchor set, ready to turn vectors of either modality into relative rows."""

    def __init__(self, image_anchors: np.ndarray, text_anchors: np.ndarray) -> None:
        img = as_matrix(image_anchors, "image anchors")
        txt = as_matrix(text_anchors, "text anchors")
        if img.shape[0] != txt.shape[0]:
            raise InputError(f"anchor sets differ in size: {img.shape[0]} image anchors vs {txt.shape[0]} text anchors")
        if img.shape[0] == 0:
            raise InputError("anchor set is empty")
        self._anchors: dict[str, np.ndarray] = {"image": img, "text": txt}
        self._indexes: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def n_anchors(self) -> int:
        """Number N of anchor pairs (the dimension of relative rows)."""
        return self._anchors["image"].shape[0]

    def dim(self, modality: Modality) -> int:
        """Embedding dimension of the anchors of one modality."""
        return self._anchors[self._check_modality(modality)].shape[1]

    def _check_modality(self, modality: str) -> str:
        if modality not in self._anchors:
            raise InputError(f"modality must be 'image' or 'text', got {modality!r}")
        return modality

    def _index(self, modality: str) -> Any:
        with self._lock:
            index = self._indexes.get(modality)
            if index is None:
                index = _flat_ip_index(self._anchors[modality])
                self._indexes[modality] = index
            return index

    def relative(
        self,
        vectors: np.ndarray,
        modality: Modality,
        params: AsifParams,
        batch_size: int = 4096,
    ) -> sp.csr_matrix:
        """Relative rows (n, N) of ``vectors`` embedded by the ``modality`` encoder."""
        checked = self._check_modality(modality)
        batch_size = _check_batch_size(batch_size)
        v = as_matrix(vectors, f"{checked} vectors")
        _check_dims(v, self._anchors[checked])
        k, p = params.chosen()
        scores, ids = _search_flat(self._index(checked), v, k, batch_size)
        return _relative_from_topk(scores, ids, self.n_anchors, p)


# --------------------------------------------------------------------------- sparse index


class SparseRelativeIndex:
    """Relative rows of a collection, stored as per-anchor posting lists (:mod:`retrieval.asif.postings`).

    ``values`` is the stored precision: ``"float16"`` (the default; each value rounded with relative
    error <= 2**-12, so a score of unit-norm rows is within 2.5e-4 of the float32 one) or ``"float32"``.
    """

    file_suffix = ".postings.npy"  # the writer names the file of :meth:`save` with this

    def __init__(self, rows: sp.csr_matrix | PostingLists, values: str = "float16") -> None:
        """Index ``rows`` (any scipy sparse matrix, stored at ``values`` precision) or wrap posting lists as they
        are."""
        if isinstance(rows, PostingLists):
            self._lists = rows  # e.g. memory-mapped: no copy
        else:
            self._lists = PostingLists.from_csr(as_csr(rows, "relative rows"), values)
        self._sketch: RelativeSketch | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._lists.n_rows

    @property
    def n_anchors(self) -> int:
        """Number N of anchors (columns) of the stored rows."""
        return self._lists.n_anchors

    @property
    def postings(self) -> PostingLists:
        """The stored posting lists (read-only views)."""
        return self._lists

    @property
    def rows(self) -> sp.csr_matrix:
        """The stored rows as a float32 (n, N) CSR matrix, built from the posting lists on each access."""
        return self._lists.to_csr()

    def sketch(self) -> RelativeSketch:
        """The approximate route's dense first stage, built on first use (seconds per million rows) and kept."""
        with self._lock:
            if self._sketch is None:
                self._sketch = RelativeSketch.build(self._lists)
            return self._sketch

    def search(
        self, queries: sp.csr_matrix, k: int, allowed: np.ndarray | None = None, *, candidates: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by sparse inner product with each query row.

        Returns ``(scores (q, k') float32, positions (q, k') int64)``, sorted by
        descending score with ties broken by lower position; ``k' = min(k, len(self))``.
        Each query reads only the posting lists of its non-zero anchors (exact).
        ``candidates`` (opt-in, approximate): rank only the best ``max(candidates, k)`` rows of
        a dense sketch (:mod:`retrieval.asif.sketch`), rescored exactly; for few anchors and many
        rows (recall against the exact route: benchmarks/ASIF_SCALE.md).
        ``allowed`` (sorted positions) restricts the search to those rows (then ``k' = min(k, len(allowed))``),
        always by the exact route.
        """
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise InputError(f"k must be an integer >= 1, got {k!r}")
        if candidates is not None and (
            isinstance(candidates, bool) or not isinstance(candidates, numbers.Integral) or candidates < 1
        ):
            raise InputError(f"candidates must be an integer >= 1 or None, got {candidates!r}")
        q = as_csr(queries, "queries")
        if q.shape[1] != self.n_anchors:
            raise InputError(f"queries have {q.shape[1]} anchor columns but the index has {self.n_anchors}")
        allowed = None if allowed is None else np.asarray(allowed, np.int64)
        kk = min(int(k), len(self) if allowed is None else len(allowed))
        scores = np.zeros((q.shape[0], kk), dtype=np.float32)
        positions = np.zeros((q.shape[0], kk), dtype=np.int64)
        if kk == 0:
            return scores, positions
        sketch = None if candidates is None or allowed is not None else self.sketch()
        for i in range(q.shape[0]):
            cols = q.indices[q.indptr[i] : q.indptr[i + 1]].astype(np.int64)
            weights = q.data[q.indptr[i] : q.indptr[i + 1]]
            if sketch is not None:
                scores[i], positions[i] = self._rescored(sketch, cols, weights, max(int(candidates), kk), kk)
                continue
            acc = self._lists.scores(cols, weights).astype(np.float32)
            if allowed is None:
                scores[i], positions[i] = top_k_scores(acc, kk)
            else:  # sorted positions: the lower position still wins a tie
                scores[i], at = top_k_scores(acc[allowed], kk)
                positions[i] = allowed[at]
        return scores, positions

    def _rescored(
        self, sketch: RelativeSketch, cols: np.ndarray, weights: np.ndarray, count: int, kk: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-kk of the sketch's ``count`` candidates by exact score (ties: lower position)."""
        cand = sketch.candidates(cols, weights, count)
        exact = self._lists.scores_at(cols, weights, cand).astype(np.float32)
        s, pos = top_k_row(exact, min(kk, cand.shape[0]))
        out_s, out_p = np.zeros(kk, np.float32), np.zeros(kk, np.int64)
        out_s[: s.shape[0]], out_p[: s.shape[0]] = s, cand[pos]
        return out_s, out_p

    def save(self, path: Path) -> None:
        """Write the posting lists to ``path`` (one uint8 .npy file, no pickle) atomically."""
        self._lists.save(Path(path))

    @classmethod
    def load(cls, path: Path) -> SparseRelativeIndex:
        """Read rows written by :meth:`save` (memory-mapped) or by format v1 (a CSR .npz, read into memory).

        A missing or corrupt file raises IndexFormatError naming it.
        """
        path = Path(path)
        if not path.is_file():
            raise IndexFormatError(f"{path}: relative-row file not found")
        with open(path, "rb") as fh:
            magic = fh.read(6)
        if magic == b"\x93NUMPY":
            return cls(PostingLists.load(path))
        return cls(load_csr_npz(path), values="float32")  # format v1: as exact as it was
