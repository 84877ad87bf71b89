"""The dense projected ASIF route: relative weights over the N anchors times the *other* modality's anchor embeddings
give a vector in that encoder's own space."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from retrieval.asif.relative import as_csr, as_matrix
from retrieval.core.errors import InputError


def normalize_rows(m: np.ndarray) -> np.ndarray:
    """L2-normalise the rows of a float array in place; all-zero rows stay zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", m, m))
    nz = norms > 0
    m[nz] /= norms[nz, None]
    return m


def project_to_modality(relative_rows: sp.csr_matrix, target_anchors: np.ndarray) -> np.ndarray:
    """Dense projected ASIF route: ``relative_rows @ target_anchors``, rows L2-normalised.

    ``relative_rows`` (n, N) are relative rows computed against one modality's
    anchors; ``target_anchors`` (N, d) are the *other* modality's anchor
    embeddings. The result (n, d) float32 lives in the target encoder's space and
    is comparable by inner product with that encoder's normalised vectors.
    All-zero rows stay zero.
    """
    rows = as_csr(relative_rows, "relative rows")
    anchors = as_matrix(target_anchors, "target anchors")
    if rows.shape[1] != anchors.shape[0]:
        raise InputError(
            f"relative rows have {rows.shape[1]} anchor columns but there are {anchors.shape[0]} target anchors"
        )
    out = np.asarray(rows.astype(np.float64) @ anchors.astype(np.float64))
    return normalize_rows(out).astype(np.float32)
