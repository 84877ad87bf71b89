"""Per-anchor posting lists of relative rows: the storage and the query kernel of the exact sparse ASIF route.

A collection's relative rows (n x N, at most k non-zeros per row) are kept transposed: for each
anchor j, the rows that use it (int32 row ids, ascending) and their weights (float16 by default).
A query row with k non-zeros then reads only its k columns: its score vector is
``sum_j w_j * column_j``, accumulated into one dense buffer with ``np.bincount`` and cut to the
top results with ``argpartition``. Because row ids ascend within a column, the scores of a few
candidate rows (the approximate route's rescoring) take one binary search per column.

On disk the lists are one ``.npy`` file of raw bytes (a 64-byte header, then indptr int64 (N+1),
row ids int32 (nnz), values (nnz)), loaded memory-mapped: opening a million-row index reads
nothing but what the validation touches, and queries page in only the columns they use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from retrieval.core.atomic import atomic_path
from retrieval.core.errors import IndexFormatError, InputError

MAGIC = b"ASIFPOST"
FORMAT_VERSION = 1
HEADER_BYTES = 64
VALUE_TYPES: dict[str, np.dtype[Any]] = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
_CHECK_CHUNK = 1 << 24  # elements per validation step (bounded temporaries)


def as_csr(rows: Any, name: str) -> sp.csr_matrix:
    """Validate a 2-D sparse matrix and return it as canonical float32 CSR."""
    if not sp.issparse(rows):
        raise InputError(f"{name} must be a scipy sparse matrix, got {type(rows).__name__}")
    if rows.ndim != 2:
        raise InputError(f"{name} must be 2-D, got shape {rows.shape}")
    m = sp.csr_matrix(rows, dtype=np.float32, copy=True)  # never touch the caller's arrays
    m.sum_duplicates()  # also sorts indices
    if not np.isfinite(m.data).all():
        raise InputError(f"{name} contain NaN or infinite values")
    return m


def top_k_row(s: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-kk of one dense score row: descending score, ties by lower position."""
    n = s.shape[0]
    if kk < n:
        cut = np.argpartition(s, n - kk)[n - kk :]
        t = s[cut].min()
        above = np.flatnonzero(s > t)
        tied = np.flatnonzero(s == t)[: kk - above.size]
        cand = np.concatenate([above, tied])
    else:
        cand = np.arange(n)
    order = np.lexsort((cand, -s[cand]))
    pos = cand[order]
    return s[pos], pos


def top_k_scores(acc: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-kk of a dense score row; when kk rows score > 0 only those are ranked (the others cannot win)."""
    cand = np.flatnonzero(acc > 0)
    if cand.size < kk:
        return top_k_row(acc, kk)
    s, pos = top_k_row(acc[cand], kk)  # cand ascends, so ties still go to the lower position
    return s, cand[pos]


def load_csr_npz(path: Path) -> sp.csr_matrix:
    """The CSR matrix of a format-v1 relative-row file (scipy .npz, no pickle)."""
    try:
        m = sp.load_npz(path)  # np.load(..., allow_pickle=False) inside
        if m.format not in ("csr", "csc") or m.ndim != 2:
            raise ValueError(f"expected a 2-D CSR matrix, found format {m.format!r}")
        m = sp.csr_matrix(m)
        m.check_format(full_check=True)
    except Exception as exc:  # zip, npy header, key and structure errors alike
        raise IndexFormatError(f"{path}: not a readable relative-row file ({type(exc).__name__}: {exc})") from exc
    return m


def _value_type(values: str) -> np.dtype[Any]:
    if values not in VALUE_TYPES:
        raise InputError(f"values must be one of {sorted(VALUE_TYPES)}, got {values!r}")
    return VALUE_TYPES[values]


def _padded(nbytes: int) -> int:
    return (nbytes + 7) // 8 * 8


@dataclass(frozen=True)
class PostingLists:
    """The (N+1) column pointers, row ids and values of n relative rows over N anchors, columns sorted by value."""

    indptr: np.ndarray  # int64 (N + 1,)
    rows: np.ndarray  # int32 (nnz,)
    values: np.ndarray  # float16 or float32 (nnz,)
    n_rows: int

    @property
    def n_anchors(self) -> int:
        """Number N of anchors (columns)."""
        return self.indptr.shape[0] - 1

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays (what the file holds, less its header)."""
        return int(self.indptr.nbytes + self.rows.nbytes + self.values.nbytes)

    @classmethod
    def from_csr(cls, m: sp.csr_matrix, values: str = "float16") -> PostingLists:
        """Posting lists of a canonical float32 CSR matrix (see :func:`as_csr`); zeros are dropped.

        ``values="float16"`` rounds each stored value to float16 (relative error <= 2**-12; values
        above float16's range, 65504, make it an InputError: use ``values="float32"``).
        """
        dtype = _value_type(values)
        n, n_anchors = m.shape
        if n >= 2**31:
            raise InputError(f"relative rows: at most 2**31 - 1 rows, got {n}")
        if m.data.size and np.abs(m.data).max() > np.finfo(dtype).max:
            raise InputError(f"relative rows have values outside the {values} range; store them as float32")
        vals = m.data.astype(dtype)
        rounded = sp.csr_matrix((vals.astype(np.float32), m.indices, m.indptr), shape=m.shape)
        rounded.eliminate_zeros()  # also what float16 rounds to zero
        csc = rounded.tocsc()  # a counting sort: row ids ascend within each column
        csc.sort_indices()
        return cls(csc.indptr.astype(np.int64), csc.indices.astype(np.int32), csc.data.astype(dtype), int(n))

    def to_csr(self) -> sp.csr_matrix:
        """The rows as a canonical float32 CSR matrix (n, N) (built on each call)."""
        csc = sp.csc_matrix(
            (np.asarray(self.values, dtype=np.float32), np.asarray(self.rows), np.asarray(self.indptr)),
            shape=(self.n_rows, self.n_anchors),
        )
        out = csc.tocsr()
        out.sort_indices()
        return out

    def scores(self, cols: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Dense float64 scores (n,) of one query: ``sum_j weights[j] * column cols[j]``."""
        starts = self.indptr[cols]
        ends = self.indptr[cols + 1]
        lengths = ends - starts
        if lengths.sum() == 0:
            return np.zeros(self.n_rows, dtype=np.float64)
        row_ids = np.concatenate([self.rows[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)])
        vals = np.concatenate([self.values[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)])
        contrib = vals.astype(np.float64)
        contrib *= np.repeat(weights.astype(np.float64), lengths)
        acc = np.bincount(row_ids, weights=contrib, minlength=self.n_rows)
        if acc.shape[0] != self.n_rows:  # only a corrupt file can hold a row id >= n
            raise IndexFormatError(f"posting lists hold a row id >= {self.n_rows}")
        return acc

    def scores_at(self, cols: np.ndarray, weights: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Exact float64 scores of the ascending row ids ``candidates`` only.

        One binary search of the candidates per query column (row ids ascend within a column),
        so the cost grows with k x candidates x log(column length), not with the columns' lengths.
        """
        acc = np.zeros(candidates.shape[0], dtype=np.float64)
        for j, w in zip(cols.tolist(), weights.astype(np.float64).tolist(), strict=True):
            a, b = int(self.indptr[j]), int(self.indptr[j + 1])
            if a == b:
                continue
            column = self.rows[a:b]
            at = np.minimum(np.searchsorted(column, candidates), b - a - 1)
            hit = column[at] == candidates
            acc += np.where(hit, self.values[a:b][at].astype(np.float64), 0.0) * w
        return acc

    def save(self, path: Path) -> None:
        """Write the lists to ``path`` as one uint8 ``.npy`` file (no pickle), atomically."""
        n_anchors, nnz = self.n_anchors, self.rows.shape[0]
        code = 16 if self.values.dtype == np.float16 else 32
        header = np.zeros(HEADER_BYTES, dtype=np.uint8)
        header[:8] = np.frombuffer(MAGIC, dtype=np.uint8)
        header[8:56] = np.array([FORMAT_VERSION, self.n_rows, n_anchors, nnz, code, 0], np.int64).view(np.uint8)
        offsets = _offsets(n_anchors, nnz, self.values.dtype.itemsize)
        with atomic_path(Path(path)) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(offsets[-1],))
            out[:HEADER_BYTES] = header
            dtypes: tuple[np.dtype[Any], ...] = (np.dtype(np.int64), np.dtype(np.int32), self.values.dtype)
            for start, array, dtype in zip(offsets, (self.indptr, self.rows, self.values), dtypes, strict=False):
                out[start : start + array.nbytes] = np.ascontiguousarray(array, dtype=dtype).view(np.uint8)
            out.flush()
            del out

    @classmethod
    def load(cls, path: Path) -> PostingLists:
        """Memory-map lists written by :meth:`save`; a malformed file raises IndexFormatError naming it."""
        try:
            raw = np.load(path, mmap_mode="r", allow_pickle=False)
            return _parse(raw)
        except IndexFormatError as exc:
            raise IndexFormatError(f"{path}: not a readable posting-list file ({exc})") from exc
        except Exception as exc:  # npy header, mmap and shape errors alike
            raise IndexFormatError(f"{path}: not a readable posting-list file ({type(exc).__name__}: {exc})") from exc


def _offsets(n_anchors: int, nnz: int, value_size: int) -> tuple[int, int, int, int]:
    """Byte offsets of indptr, row ids, values, and the total size."""
    a = HEADER_BYTES
    b = a + 8 * (n_anchors + 1)
    c = b + _padded(4 * nnz)
    return a, b, c, c + _padded(value_size * nnz)


def _parse(raw: np.ndarray) -> PostingLists:
    """Views into a mapped file, after checking the header, sizes, pointers, row ids and values."""
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.shape[0] < HEADER_BYTES:
        raise IndexFormatError(f"expected a 1-D uint8 array of >= {HEADER_BYTES} bytes, got {raw.dtype} {raw.shape}")
    if bytes(raw[:8]) != MAGIC:
        raise IndexFormatError("bad magic bytes")
    version, n_rows, n_anchors, nnz, code, _ = (int(x) for x in np.array(raw[8:56]).view(np.int64))
    if version != FORMAT_VERSION:
        raise IndexFormatError(f"format version {version}, expected {FORMAT_VERSION}")
    if code not in (16, 32) or min(n_rows, n_anchors, nnz) < 0 or n_rows >= 2**31:
        raise IndexFormatError(f"bad header (rows {n_rows}, anchors {n_anchors}, nnz {nnz}, value bits {code})")
    dtype = np.dtype(np.float16 if code == 16 else np.float32)
    offsets = _offsets(n_anchors, nnz, dtype.itemsize)
    if raw.shape[0] != offsets[-1]:
        raise IndexFormatError(f"size {raw.shape[0]} bytes, the header implies {offsets[-1]}")
    indptr = raw[offsets[0] : offsets[1]].view(np.int64)
    rows = raw[offsets[1] : offsets[1] + 4 * nnz].view(np.int32)
    values = raw[offsets[2] : offsets[2] + dtype.itemsize * nnz].view(dtype)
    if indptr[0] != 0 or indptr[-1] != nnz or (np.diff(indptr) < 0).any():
        raise IndexFormatError("column pointers are not a non-decreasing 0..nnz sequence")
    for start in range(0, nnz, _CHECK_CHUNK):
        chunk = rows[start : start + _CHECK_CHUNK]
        if chunk.min() < 0 or chunk.max() >= n_rows:
            raise IndexFormatError(f"row ids outside 0..{n_rows - 1}")
        if not np.isfinite(values[start : start + _CHECK_CHUNK]).all():
            raise IndexFormatError("values contain NaN or infinite entries")
    return PostingLists(indptr, rows, values, n_rows)
