"""Multi-view pooling of ASIF relative rows: one image described by several crops of it.

Each image contributes ``views`` consecutive vectors (the whole photo first, see
:mod:`retrieval.sources.crops`); its relative row is the mean of its views' relative
rows, L2-normalised like every relative row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from retrieval.core.errors import InputError


def pool_views(rows: sp.csr_matrix, views: int) -> sp.csr_matrix:
    """(n * views, N) relative rows -> (n, N): the L2-normalised mean of each image's ``views`` rows."""
    rows = sp.csr_matrix(rows)
    if views < 1 or rows.shape[0] % views:
        raise InputError(f"{rows.shape[0]} relative rows are not {views} views per image")
    n = rows.shape[0] // views
    mean = sp.kron(
        sp.identity(n, format="csr", dtype=np.float32), np.full((1, views), 1.0 / views, np.float32), format="csr"
    )
    pooled = (mean @ rows).tocsr().astype(np.float32)
    norms = np.sqrt(np.asarray(pooled.multiply(pooled).sum(axis=1)).ravel())
    pooled = (sp.diags(1.0 / np.maximum(norms, 1e-12)).astype(np.float32) @ pooled).tocsr()
    pooled.sort_indices()
    return pooled


def relative_of_views(spaces: Any, view_vectors: np.ndarray, params: Any) -> sp.csr_matrix:
    """Pooled image relative rows from (n, views, dim) view vectors through ``spaces`` (an AnchorSpaces)."""
    view_vectors = np.asarray(view_vectors, np.float32)
    if view_vectors.ndim != 3:
        raise InputError(f"view vectors must be (images, views, dim), got shape {view_vectors.shape}")
    n, views, dim = view_vectors.shape
    return pool_views(spaces.relative(view_vectors.reshape(n * views, dim), "image", params), views)
