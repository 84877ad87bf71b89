"""The vector parts of an opened index, each loaded once on first use: FAISS indexes (placed on the
device, or the index shards of a sharded one), the stored vectors, and the deleted positions.

A base class of :class:`~retrieval.api.engine.Index`, which sets the attributes used here
(``store``, ``manifest``, ``_parts``, ``_files``, ``_on_device``, ``mmap``, ``ray``, ``device``, ``path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retrieval.api.lazy import OnceCache
from retrieval.api.shards import open_shards
from retrieval.core.errors import IndexFormatError
from retrieval.index.placement import place_index
from retrieval.index.selection import live_mask
from retrieval.index.source import VectorSource
from retrieval.index.vector_index import Exclusions
from retrieval.index.vector_sets import spec_of
from retrieval.store.reader import StoreReader


class VectorParts:
    """Lazily loaded vector indexes, stored vectors and deletions (see the module docstring)."""

    path: Path
    device: str
    mmap: bool
    ray: Any
    store: StoreReader
    manifest: dict[str, Any]
    _files: dict[str, Any]
    _parts: OnceCache
    _on_device: set[str]

    @property
    def _records(self) -> dict[str, Any]:
        records: dict[str, Any] = self.manifest.get("vector_indexes") or {}
        return records

    def vector_index(self, key: str) -> Any:
        """The FAISS index of ``key`` (e.g. ``clip/image``), loaded on first use and placed on the device.

        IVF indexes are memory-mapped (their lists stay on disk) unless ``mmap=False``.
        """
        return self._parts.get(("faiss", key), lambda: self._load_vector_index(key))

    def _load_vector_index(self, key: str) -> Any:
        rel = self._files["faiss"].get(key)
        spec = spec_of(self._records.get(key))
        shards = self._files.get("faiss_shards", {}).get(key)
        if shards:
            return open_shards(
                self.store, shards, self._records.get(key), self.mmap and spec.nlist is not None, self.ray
            )
        if rel is None:
            raise IndexFormatError(f"{self.path}: no vector index {key!r}; rebuild the index")
        lists = self._files.get("faiss_lists", {}).get(key)
        index = self.store.read_faiss(rel, mmap=self.mmap and spec.nlist is not None, lists=lists)
        placed = place_index(index, spec, self.device, lambda: self.vector_source(key))
        if placed is not index:
            self._on_device.add(key)
        elif spec.rerank:  # build FAISS's re-ranking view of the stored rows now, once, not in a racing search
            self.vector_source(key).native_reranker(placed)
        return placed

    def vector_source(self, key: str) -> VectorSource:
        """The stored float16 vectors of ``key``, memory-mapped (for re-ranking and the torch path)."""
        return self._parts.get(("vectors", key), lambda: self._load_vector_source(key))

    def _load_vector_source(self, key: str) -> VectorSource:
        source: VectorSource = self.store.vector_source(self._files["vectors"][key])
        if spec_of(self._records.get(key)).rerank:  # read a few rows per query: no readahead around them
            source.advise_random_access()
        return source

    def _exclusions(self, kind: str) -> Exclusions | None:
        """The deleted positions of ``kind`` (None when nothing was deleted)."""
        return self._parts.get(("deleted", kind), lambda: self._load_exclusions(kind))

    def _load_exclusions(self, kind: str) -> Exclusions | None:
        rel = (self._files.get("deleted") or {}).get(kind)
        positions = self.store.read_array(rel) if rel else np.zeros(0, np.int64)
        return Exclusions(positions, self.rows(kind)) if len(positions) else None

    def rows(self, kind: str) -> int:
        """Stored rows of ``kind``, deleted ones included (positions run from 0 to rows - 1)."""
        return int((self.manifest.get("rows") or self.manifest["counts"])[kind])

    def live(self, kind: str) -> np.ndarray:
        """True for each stored row of ``kind`` that is not deleted."""
        return live_mask(self.rows(kind), self.deleted(kind))

    def deleted(self, kind: str) -> np.ndarray:
        """Positions of the deleted ``kind`` items (their rows stay in :meth:`items` until compaction)."""
        exclude = self._exclusions(kind)
        return exclude.positions if exclude is not None else np.zeros(0, np.int64)
