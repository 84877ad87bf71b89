"""FAISS vector indexes: build, search, and place on GPUs when faiss-gpu is installed.

Kept behind these few functions so approximate index types can slot in later.
Positions returned by :func:`search` are row numbers of the vectors added.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError

INDEX_TYPES = ("flat",)


def build_vector_index(vectors: np.ndarray, index_type: str = "flat") -> Any:
    """Build an inner-product FAISS index over L2-normalised ``vectors`` (rows)."""
    import faiss

    if index_type not in INDEX_TYPES:
        raise InputError(f"unknown index type {index_type!r}; choose one of: {', '.join(INDEX_TYPES)}")
    vectors = _as_matrix(vectors)
    index = faiss.IndexFlatIP(vectors.shape[1])
    if len(vectors):
        index.add(vectors)
    return index


def to_available_gpus(index: Any) -> Any:
    """Move ``index`` to all GPUs when faiss was built with GPU support; else return it unchanged."""
    import faiss

    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = True
    return faiss.index_cpu_to_all_gpus(index, co=options)


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product search; returns (scores, positions), each (q, k') with k' = min(k, ntotal)."""
    queries = _as_matrix(queries)
    if queries.shape[1] != index.d:
        raise InputError(f"query vectors have dimension {queries.shape[1]}, the index has {index.d}")
    k = min(int(k), int(index.ntotal))
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    scores, positions = index.search(queries, k)
    return scores, positions.astype(np.int64)


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise InputError(f"expected a 2-D matrix of vectors, got shape {vectors.shape}")
    return vectors
