"""Vector sources: float16 shards (memory-mapped) seen as one matrix, read in chunks or gathered by row, without
loading them whole."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from retrieval.core.errors import InputError
from retrieval.index.faiss_views import refine_with_rows

ADD_CHUNK = 65_536


SERIAL_ELEMENTS = 32_768  # torch's grain size: smaller tensor operations run on the calling thread


class VectorSource:
    """Row-concatenated matrices (float16 or float32, in memory or memory-mapped) read in float32 chunks.

    Lets an index be trained and filled from shards on disk without holding
    the whole collection in memory, and lets a shortlist be re-ranked from the
    stored float16 rows.
    """

    def __init__(self, parts: Sequence[np.ndarray] | np.ndarray) -> None:
        if isinstance(parts, np.ndarray):
            parts = [parts]
        self.parts = [p for p in parts if len(p)] or list(parts[:1])
        dims = {p.shape[1] for p in self.parts if p.ndim == 2}
        if any(p.ndim != 2 for p in self.parts) or len(dims) > 1:
            raise InputError(
                f"expected 2-D vector matrices of one dimension, got shapes {[p.shape for p in self.parts]}"
            )
        self.dim = dims.pop() if dims else 0
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def chunks(self, size: int = ADD_CHUNK) -> Iterator[np.ndarray]:
        """Consecutive float32 blocks of ``size`` rows (the last one shorter), in order, across parts."""
        pending: list[np.ndarray] = []
        held = 0
        for part in self.parts:
            start = 0
            while start < len(part):
                piece = part[start : start + size - held]
                start += len(piece)
                pending.append(piece)
                held += len(piece)
                if held == size:
                    yield _joined(pending)
                    pending, held = [], 0
        if pending:
            yield _joined(pending)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 rows at positions ``rows`` (any shape); negative positions give zero rows."""
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        valid = flat >= 0
        if len(self.parts) == 1 and valid.all():  # the common case: one gather, one conversion
            return self._gather(0, flat).reshape(*rows.shape, self.dim)
        out = np.zeros((len(flat), self.dim), np.float32)
        part_of = np.searchsorted(self.offsets, flat, side="right") - 1
        for number in range(len(self.parts)):
            mask = (part_of == number) & valid
            if mask.any():
                out[mask] = self._gather(number, flat[mask] - self.offsets[number])
        return out.reshape(*rows.shape, self.dim)

    def _gather(self, part: int, rows: np.ndarray) -> np.ndarray:
        """Rows of one part as float32: gathered by numpy (a plain copy of the float16 rows), converted by
        torch on this thread, in blocks small enough that torch never starts its thread pool (its threads
        and FAISS's fight over the cores: benchmarks/ANN.md); numpy's float16 conversion is slower. The
        gathered copy is writable, so torch is never handed the read-only memory map (which it warns about)
        and nothing is cached: safe from many threads."""
        import torch

        gathered = torch.from_numpy(np.ascontiguousarray(np.take(self.parts[part], rows, axis=0)))
        out = np.empty((len(rows), self.dim), np.float32)
        into = torch.from_numpy(out)
        step = max(1, SERIAL_ELEMENTS // max(self.dim, 1))
        for start in range(0, len(rows), step):
            into[start : start + step] = gathered[start : start + step]
        return out

    def advise_random_access(self) -> int:
        """Tell the kernel the memory-mapped parts are read a few scattered rows at a time (``MADV_RANDOM``).

        Re-ranking reads ~400 rows of 1 KB per query; with default readahead each one
        pulls in far more from disk when the rows are not cached: 5 instead of 56
        queries/s at 10M vectors under a 4 GB memory limit (benchmarks/ANN.md). Returns
        how many maps were advised (0 where the platform or the parts do not allow it).
        """
        import mmap

        advised = 0
        for part in self.parts:
            mapping = getattr(part, "_mmap", None)  # numpy.memmap's own map of the file
            if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_RANDOM"):
                mapping.madvise(mmap.MADV_RANDOM)
                advised += 1
        return advised

    def native_reranker(self, index: Any) -> Any | None:
        """``index`` re-ranking its shortlist in FAISS from these rows, viewed in place (None where not possible)."""
        rerankers = self.__dict__.setdefault("_rerankers", {})  # (index, reranker) by id(index); RowSubset too
        entry = rerankers.get(id(index))
        if entry is None:
            single = self.parts[0] if len(self.parts) == 1 and isinstance(self.parts[0], np.ndarray) else None
            entry = rerankers[id(index)] = (index, refine_with_rows(index, single) if single is not None else None)
        return entry[1]

    def sample(self, count: int, seed: int = 0) -> np.ndarray:
        """``count`` distinct rows chosen at random (all rows when there are fewer), as float32."""
        n = len(self)
        if count >= n:
            return np.concatenate(list(self.chunks())) if n else np.zeros((0, self.dim), np.float32)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))
        return self.take(rows)

    def all(self) -> np.ndarray:
        """Every row as one float32 matrix (only for collections that fit in memory)."""
        return self.sample(len(self))


class RowSubset(VectorSource):
    """Some rows of a :class:`VectorSource`, in the order given, read lazily (for compaction)."""

    def __init__(self, source: VectorSource, rows: np.ndarray) -> None:
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)
        self.dim = source.dim
        self.parts = [self]  # type: ignore[list-item]
        self.offsets = np.array([0, len(self.rows)])

    def __len__(self) -> int:
        return len(self.rows)

    def chunks(self, size: int = ADD_CHUNK) -> Iterator[np.ndarray]:
        for start in range(0, len(self.rows), size):
            yield self.source.take(self.rows[start : start + size])

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        mapped = (
            np.where(rows >= 0, self.rows[np.clip(rows, 0, max(len(self.rows) - 1, 0))], -1)
            if len(self.rows)
            else np.full(rows.shape, -1)
        )
        return self.source.take(mapped)


def _joined(pieces: list[np.ndarray]) -> np.ndarray:
    if len(pieces) == 1:
        return np.ascontiguousarray(pieces[0], dtype=np.float32)
    return np.concatenate([np.asarray(piece, dtype=np.float32) for piece in pieces])


def as_source(vectors: VectorSource | np.ndarray | Sequence[np.ndarray]) -> VectorSource:
    return vectors if isinstance(vectors, VectorSource) else VectorSource(vectors)
