"""Writes the files of one build; nothing becomes visible until the manifest is committed."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.core.atomic import atomic_open, atomic_path, write_json_atomic
from retrieval.core.digests import new_build_id, sha256_file
from retrieval.core.errors import IndexFormatError
from retrieval.store.layout import (
    BUILD_ID_PATTERN,
    DATA_DIRS,
    ERRORS_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    ROOT_TEMP_PATTERN,
    VECTOR_CHUNK_ROWS,
)
from retrieval.store.manifest import manifest_digest

if TYPE_CHECKING:
    import pyarrow as pa


class StoreWriter:
    """Writes the files of one build; nothing becomes visible until :meth:`commit`.

    Hold :func:`retrieval.store.locking.writer_lock` on the directory around the whole build.
    """

    def __init__(self, root: str | Path, kind: str) -> None:
        self.root = Path(root)
        self.kind = kind
        self.build_id = new_build_id()
        self.root.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, dict[str, Any]] = {}

    def _finish(self, rel: str) -> str:
        path = self.root / rel
        self.files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        return rel

    def carry(self, rel: str, meta: Mapping[str, Any]) -> str:
        """Keep a file of the previous build in this one, unchanged (its checksum entry is reused)."""
        if not (self.root / rel).is_file():
            raise IndexFormatError(f"{self.root / rel}: missing; cannot carry it into the new build")
        self.files[rel] = dict(meta)
        return rel

    def write_array(self, folder: str, stem: str, array: np.ndarray) -> str:
        """Write one ``.npy`` file (never pickled) and return its relative path."""
        rel = f"{folder}/{stem}-{self.build_id}.npy"
        with atomic_path(self.root / rel) as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        return self._finish(rel)

    def write_vectors(self, space: str, kind: str, vectors: Any, first_shard: int = 0) -> list[str]:
        """Write L2-normalised vectors (a matrix or a ``VectorSource``) as one float16 shard, streamed in chunks.

        One contiguous file per build (``add`` appends further shards): FAISS can then
        re-rank from it in place (see ``faiss_views``), and a memory-mapped read is one map.
        """
        from retrieval.index.source import as_source

        source = as_source(vectors)  # checks for one 2-D matrix (or parts of one dimension)
        rows, dim = len(source), source.dim
        rel = f"vectors/{space}/{kind}-{first_shard:05d}-{self.build_id}.npy"
        with atomic_path(self.root / rel) as tmp:
            if rows == 0:  # numpy cannot map an empty file region
                with open(tmp, "wb") as handle:
                    np.save(handle, np.zeros((0, dim), np.float16), allow_pickle=False)
            else:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(rows, dim))
                start = 0
                for chunk in source.chunks(VECTOR_CHUNK_ROWS):
                    out[start : start + len(chunk)] = chunk
                    start += len(chunk)
                out.flush()
                del out
        return [self._finish(rel)]

    def write_table(self, stem: str, table: pa.Table) -> str:
        """Write a parquet table under ``items/``."""
        import pyarrow.parquet as pq

        rel = f"items/{self.build_id}-{stem}.parquet"
        with atomic_path(self.root / rel) as tmp:
            pq.write_table(table, tmp)
        return self._finish(rel)

    def write_faiss(self, stem: str, index: Any) -> str:
        """Write a FAISS index under ``faiss/``."""
        import faiss

        rel = f"faiss/{stem}-{self.build_id}.index"
        with atomic_path(self.root / rel) as tmp:
            faiss.write_index(index, str(tmp))
        return self._finish(rel)

    def new_file(self, folder: str, stem: str, suffix: str) -> tuple[str, Path]:
        """(relative path, path) of a data file of this build that the caller writes itself, then :meth:`record` s."""
        rel = f"{folder}/{stem}-{self.build_id}{suffix}"
        (self.root / folder).mkdir(parents=True, exist_ok=True)
        return rel, self.root / rel

    def record(self, rel: str) -> str:
        """List a file written under :meth:`new_file`'s name in this build's checksums."""
        return self._finish(rel)

    def write_sparse(self, stem: str, relative_index: Any) -> str:
        """Write a sparse relative index (``SparseRelativeIndex``) under ``relative/``, named with its
        ``file_suffix``."""
        suffix = getattr(relative_index, "file_suffix", ".npz")
        rel = f"relative/{stem}-{self.build_id}{suffix}"
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        relative_index.save(self.root / rel)
        return self._finish(rel)

    def commit(self, manifest: Mapping[str, Any], errors: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """Write the errors, then the manifest (the commit point), then the top-level errors copy; remove stale files.

        The skipped items go to ``items/<build>-errors.jsonl`` (checksummed and pinned like any data
        file, so readers always see the errors of the build they opened) and, once the manifest is
        committed, to a plain ``errors.jsonl`` copy at the top, for people: a kill before the commit
        leaves the copy describing the committed build, and one right after it leaves the previous
        build's copy, which the next writer puts right (:func:`sync_errors_copy`).
        """
        errors = list(errors)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in errors)
        data = text.encode("utf-8", "backslashreplace")  # lone surrogates (undecodable file names) stay readable
        rel = f"items/{self.build_id}-errors.jsonl"
        with atomic_path(self.root / rel) as tmp:
            tmp.write_bytes(data)
        self._finish(rel)
        full = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "build_id": self.build_id,
            **manifest,
            "checksums": self.files,
            "errors": len(errors),
            "errors_file": rel,
        }
        full["manifest_sha256"] = manifest_digest(full)
        write_json_atomic(self.root / MANIFEST_NAME, full)
        _write_errors_copy(self.root, data)
        remove_stale_files(self.root, keep=set(self.files))
        return full


def sync_errors_copy(root: str | Path) -> bool:
    """Make the top-level ``errors.jsonl`` a copy of the committed build's errors file, if it is not.

    A writer killed between its manifest commit and that copy leaves the previous build's copy;
    the next writer calls this (under the writer lock). An index without a committed manifest,
    or whose manifest names no errors file (format v1 before errors were pinned), is left alone.
    Returns whether the copy was rewritten.
    """
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
        rel = manifest["errors_file"]
        if not (isinstance(rel, str) and rel.startswith("items/") and ".." not in Path(rel).parts):
            return False
        data = (root / rel).read_bytes()
    except (OSError, ValueError, KeyError, TypeError):  # nothing committed, or a manifest the reader will report
        return False
    try:
        if (root / ERRORS_NAME).read_bytes() == data:
            return False
    except OSError:
        pass
    _write_errors_copy(root, data)
    return True


def _write_errors_copy(root: Path, data: bytes) -> None:
    with atomic_open(root / ERRORS_NAME, "wb") as handle:
        handle.write(data)


def remove_stale_files(root: Path, keep: set[str]) -> list[str]:
    """Delete data files of other builds (leftovers of killed builds or replaced ones) and temporary files.

    Only safe under the writer lock: another build's files in progress would go too.
    """
    removed = []
    for folder in DATA_DIRS:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if (
                path.is_file()
                and rel not in keep
                and (BUILD_ID_PATTERN.search(path.name) or path.name.endswith(".tmp"))
            ):
                path.unlink(missing_ok=True)
                removed.append(rel)
    for path in sorted(root.iterdir()):
        if ROOT_TEMP_PATTERN.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed
