"""The directory format shared by indexes and anchor sets (format v1).

A directory holds data files whose names carry a build id, and one
``manifest.json`` that names the files of the current build. The manifest is
written last and atomically: it is the commit point. A build killed half way
leaves only unreferenced files behind, and the previous manifest (and so the
previous index) intact; the next successful commit removes the leftovers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .atomic import atomic_open, atomic_path, write_json_atomic
from .errors import IndexFormatError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
SHARD_ROWS = 65_536
_DATA_DIRS = ("items", "vectors", "faiss", "relative", "anchors")
_BUILD_ID = re.compile(r"b[0-9]{8}T[0-9]{6}-[0-9a-f]{6}")


def new_build_id() -> str:
    """A sortable, unique id for one build: ``bYYYYMMDDTHHMMSS-xxxxxx``."""
    return time.strftime("b%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class StoreWriter:
    """Writes the files of one build; nothing becomes visible until :meth:`commit`."""

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

    def write_array(self, folder: str, stem: str, array: np.ndarray) -> str:
        """Write one ``.npy`` file (never pickled) and return its relative path."""
        rel = f"{folder}/{stem}-{self.build_id}.npy"
        with atomic_path(self.root / rel) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        return self._finish(rel)

    def write_vectors(self, space: str, kind: str, vectors: np.ndarray) -> list[str]:
        """Write L2-normalised vectors as float16 shards of at most ``SHARD_ROWS`` rows."""
        vectors = np.asarray(vectors, dtype=np.float16)
        shards = []
        for number, start in enumerate(range(0, max(len(vectors), 1), SHARD_ROWS)):
            chunk = vectors[start : start + SHARD_ROWS]
            shards.append(self.write_array(f"vectors/{space}", f"{kind}-{number:05d}", chunk))
        return shards

    def write_table(self, stem: str, table: "pa.Table") -> str:  # noqa: F821
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

    def write_sparse(self, stem: str, relative_index: Any) -> str:
        """Write a sparse relative index (``SparseRelativeIndex``) under ``relative/``."""
        rel = f"relative/{stem}-{self.build_id}.npz"
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        relative_index.save(self.root / rel)
        return self._finish(rel)

    def commit(self, manifest: Mapping[str, Any], errors: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """Write ``errors.jsonl`` and then the manifest (the commit point); remove stale files."""
        full = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "build_id": self.build_id,
            **manifest,
            "checksums": self.files,
        }
        errors = list(errors)
        full["errors"] = len(errors)
        with atomic_open(self.root / ERRORS_NAME) as handle:
            for row in errors:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        write_json_atomic(self.root / MANIFEST_NAME, full)
        remove_stale_files(self.root, keep=set(self.files))
        return full


def remove_stale_files(root: Path, keep: set[str]) -> list[str]:
    """Delete data files of other builds (leftovers of killed builds or replaced ones)."""
    removed = []
    for folder in _DATA_DIRS:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and rel not in keep and (_BUILD_ID.search(path.name) or path.name.endswith(".tmp")):
                path.unlink(missing_ok=True)
                removed.append(rel)
    return removed


class StoreReader:
    """Reads a committed directory, checking its manifest and the files it names."""

    def __init__(self, root: str | Path, kind: str) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root, kind)
        self._check_files()

    def _check_files(self) -> None:
        for rel, meta in self.manifest.get("checksums", {}).items():
            path = self.root / rel
            if not path.is_file():
                raise IndexFormatError(f"{path}: missing (named in {self.root / MANIFEST_NAME}); rebuild the index")
            size = path.stat().st_size
            if size != meta.get("bytes"):
                raise IndexFormatError(
                    f"{path}: {size} bytes, the manifest says {meta.get('bytes')}; the file is damaged, rebuild the index"
                )

    def path(self, rel: str) -> Path:
        """Absolute path of a file named in the manifest."""
        return self.root / rel

    def read_array(self, rel: str, mmap: bool = False) -> np.ndarray:
        """Load one ``.npy`` file without unpickling."""
        try:
            return np.load(self.root / rel, allow_pickle=False, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"{self.root / rel}: cannot read array ({e})") from e

    def read_vectors(self, shards: list[str]) -> np.ndarray:
        """Concatenate float16 shards into one float32 matrix."""
        parts = [self.read_array(rel) for rel in shards]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)

    def read_table(self, rel: str) -> "pa.Table":  # noqa: F821
        """Load a parquet table."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(self.root / rel)
        except (OSError, pa.ArrowException) as e:
            raise IndexFormatError(f"{self.root / rel}: cannot read parquet ({e})") from e

    def read_faiss(self, rel: str) -> Any:
        """Load a FAISS index file."""
        import faiss

        try:
            return faiss.read_index(str(self.root / rel))
        except RuntimeError as e:
            raise IndexFormatError(f"{self.root / rel}: cannot read FAISS index ({str(e).splitlines()[0]})") from e

    def read_errors(self) -> list[dict[str, Any]]:
        """The rows of ``errors.jsonl`` (empty when there is none)."""
        path = self.root / ERRORS_NAME
        if not path.is_file():
            return []
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def disk_bytes(self) -> int:
        """Bytes on disk of the files the manifest names."""
        return sum(int(meta["bytes"]) for meta in self.manifest.get("checksums", {}).values())


def read_manifest(root: Path, kind: str) -> dict[str, Any]:
    """Read and check ``manifest.json`` of an index or anchor directory."""
    path = root / MANIFEST_NAME
    if not root.exists():
        raise IndexFormatError(f"{root}: no such {kind} directory")
    if not path.is_file():
        raise IndexFormatError(f"{root}: not a {kind} directory (no {MANIFEST_NAME}); build one first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{path}: manifest is not a JSON object")
    if manifest.get("format") != FORMAT_VERSION:
        raise IndexFormatError(f"{path}: format {manifest.get('format')!r}, this version reads format {FORMAT_VERSION}")
    if manifest.get("kind") != kind:
        raise IndexFormatError(f"{path}: this is a {manifest.get('kind')!r} directory, expected {kind!r}")
    return manifest


def directory_exists(root: str | Path) -> bool:
    """True when ``root`` holds a committed manifest."""
    return os.path.isfile(Path(root) / MANIFEST_NAME)
