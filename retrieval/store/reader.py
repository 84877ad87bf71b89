"""Reads a committed directory: a pinned, verified snapshot of one build."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from retrieval.core.errors import IndexFormatError
from retrieval.store.layout import (
    ERRORS_NAME,
    MANIFEST_NAME,
    NUMPY_SUFFIXES,
    OPEN_PATIENCE_S,
    READ_CHUNK,
)
from retrieval.store.manifest import current_build_id, read_manifest

if TYPE_CHECKING:
    import pyarrow as pa

    from retrieval.index.source import VectorSource

T = TypeVar("T")


class _Unpinned(Exception):
    """A file named by the manifest is missing: damaged, or a newer commit landed meanwhile."""


class StoreReader:
    """Reads a committed directory: a consistent snapshot of one build, checked against its manifest.

    ``verify=True`` (the default) hashes every file when it is first read;
    ``verify=False`` skips hashing the numpy files (vectors, anchors, relative
    rows) but still hashes FAISS and parquet files. Sizes are always checked.
    Call :meth:`close` (or use ``with``) to let go of the pinned files early;
    they are released when the reader is garbage-collected anyway.
    """

    def __init__(self, root: str | Path, kind: str, verify: bool = True) -> None:
        self.root = Path(root)
        self.kind = kind
        self.verify = verify
        self._fds: dict[str, int] = {}
        self._verified: set[str] = set()
        self._finalizer = weakref.finalize(self, _close_fds, self._fds)
        deadline = time.monotonic() + OPEN_PATIENCE_S
        while True:
            manifest = self.manifest = read_manifest(self.root, kind)
            try:
                self._pin(manifest)
            except _Unpinned as e:
                _close_fds(self._fds)
                changed = current_build_id(self.root) != manifest.get("build_id")
                if changed and time.monotonic() < deadline:
                    continue  # a newer build was committed while we opened this one: open that one
                raise IndexFormatError(str(e)) from None
            except BaseException:
                _close_fds(self._fds)
                raise
            return

    # -- opening -----------------------------------------------------------------------------

    def _pin(self, manifest: Mapping[str, Any]) -> None:
        for rel, meta in manifest["checksums"].items():
            path = self.root / rel
            fd = self._open(path, f"(named in {self.root / MANIFEST_NAME}); rebuild the index")
            self._fds[rel] = fd
            size = os.fstat(fd).st_size
            if size != meta["bytes"]:
                raise IndexFormatError(
                    f"{path}: {size} bytes, the manifest says {meta['bytes']}; the file is damaged, rebuild the index"
                )
        if "errors_file" not in manifest:  # written before errors were versioned: the top-level copy
            with contextlib.suppress(_Unpinned):
                self._fds[ERRORS_NAME] = self._open(self.root / ERRORS_NAME, "")

    def _open(self, path: Path, why: str) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise _Unpinned(f"{path}: missing {why}".rstrip()) from None
        except OSError as e:
            raise IndexFormatError(f"{path}: cannot open ({e.strerror or e})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise IndexFormatError(f"{path}: not a regular file; rebuild the index")
        return fd

    def close(self) -> None:
        """Release the pinned files; the reader cannot read afterwards."""
        _close_fds(self._fds)

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------

    def _fd(self, rel: str) -> int:
        if rel not in self.manifest["checksums"] and rel != ERRORS_NAME:
            raise IndexFormatError(f"{self.root / rel}: not listed in the checksums of {self.root / MANIFEST_NAME}")
        try:
            return self._fds[rel]
        except KeyError:
            raise IndexFormatError(f"{self.root}: the reader is closed (or {rel} was never opened)") from None

    def _read_all(self, rel: str) -> bytearray:
        fd = self._fd(rel)
        size = os.fstat(fd).st_size
        buf = bytearray(size)
        done = 0
        while done < size:  # positional reads: several threads may share one reader
            block = os.pread(fd, min(READ_CHUNK, size - done), done)
            if not block:
                raise IndexFormatError(f"{self.root / rel}: shorter than expected while reading")
            buf[done : done + len(block)] = block
            done += len(block)
        return buf

    def _must_verify(self, rel: str) -> bool:
        if rel == ERRORS_NAME:  # the legacy top-level copy has no checksum
            return False
        return self.verify or not rel.endswith(NUMPY_SUFFIXES)

    def _check_digest(self, rel: str, digest: str) -> None:
        expected = self.manifest["checksums"][rel]["sha256"]
        if digest != expected:
            raise IndexFormatError(
                f"{self.root / rel}: sha256 {digest[:12]}..., the manifest says {expected[:12]}...; "
                "the file is damaged or was altered, rebuild the index"
            )

    def _data(self, rel: str, force_verify: bool = False) -> bytearray:
        """The bytes of a manifest file, hashed against the manifest when the policy says so."""
        data = self._read_all(rel)
        if force_verify or (self._must_verify(rel) and rel not in self._verified):
            self._check_digest(rel, hashlib.sha256(data).hexdigest())
            self._verified.add(rel)
        return data

    def _verify_streaming(self, rel: str) -> None:
        if not self._must_verify(rel) or rel in self._verified:
            return
        fd = self._fd(rel)
        digest = hashlib.sha256()
        offset = 0
        while block := os.pread(fd, READ_CHUNK, offset):
            digest.update(block)
            offset += len(block)
        self._check_digest(rel, digest.hexdigest())
        self._verified.add(rel)

    def path(self, rel: str) -> Path:
        """A path that reads the pinned (and, per the policy, verified) file ``rel`` of this snapshot.

        Normally ``root/rel``; when a newer build has already deleted that file,
        the pinned descriptor's ``/proc/self/fd`` path.
        """
        fd = self._fd(rel)
        self._verify_streaming(rel)
        path = self.root / rel
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return path
        except OSError:
            pass
        pinned = Path(f"/proc/self/fd/{fd}")
        if pinned.exists():
            return pinned
        raise IndexFormatError(f"{path}: removed by a newer build while this index was open; open it again")

    def read_array(self, rel: str, mmap: bool = False) -> np.ndarray:
        """Load one ``.npy`` file without unpickling (object arrays are refused)."""
        where = self.root / rel
        if mmap:
            try:
                array: np.ndarray = self._load_by_path(
                    rel, lambda path: np.load(path, allow_pickle=False, mmap_mode="r")
                )
            except (OSError, ValueError, EOFError) as e:
                raise IndexFormatError(f"{where}: cannot read array ({e})") from e
            return array
        return _parse_npy(self._data(rel), where)

    def vector_source(self, shards: list[str]) -> VectorSource:
        """The float16 shards as one memory-mapped :class:`~retrieval.index.vector_index.VectorSource` (nothing
        loaded)."""
        from retrieval.index.source import VectorSource

        parts = [self.read_array(rel, mmap=True) for rel in shards]
        for rel, part in zip(shards, parts, strict=True):
            if part.ndim != 2 or not np.issubdtype(part.dtype, np.floating):
                raise IndexFormatError(
                    f"{self.root / rel}: a {part.dtype} array of shape {part.shape}, expected vector rows"
                )
        return VectorSource(parts)

    def read_vectors(self, shards: list[str]) -> np.ndarray:
        """Concatenate float16 shards into one float32 matrix."""
        parts = [self.read_array(rel) for rel in shards]
        if not parts:
            return np.zeros((0, 0), np.float32)
        for rel, part in zip(shards, parts, strict=True):
            if part.ndim != 2 or part.shape[1] != parts[0].shape[1] or not np.issubdtype(part.dtype, np.floating):
                raise IndexFormatError(
                    f"{self.root / rel}: a {part.dtype} array of shape {part.shape}, expected vector rows"
                )
        return np.concatenate(parts).astype(np.float32)

    def read_table(self, rel: str) -> pa.Table:
        """Load a parquet table (always verified: parquet is parsed by native code)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = self._data(rel, force_verify=True)
        try:
            return pq.read_table(pa.BufferReader(pa.py_buffer(data)))
        except (OSError, ValueError, pa.ArrowException) as e:
            raise IndexFormatError(f"{self.root / rel}: cannot read parquet ({e})") from e

    def read_faiss(self, rel: str, mmap: bool = False, lists: str | None = None) -> Any:
        """Load a FAISS index file; its bytes are always verified (and a flat index's header checked) first.

        With ``mmap``, the file is hashed in a streaming pass and then memory-mapped
        (IVF lists stay on disk: an index larger than RAM remains searchable).
        ``lists``: the ``.ivfdata`` file that holds the index's IVF lists (a distributed build's
        merge), verified too; mapped read-only, or copied into memory without ``mmap``.
        """
        import faiss

        from retrieval.index.vector_index import read_vector_index

        where = self.root / rel
        if lists is not None:
            return self._read_with_lists(rel, lists, in_memory=not mmap)
        if mmap:
            try:
                return self._load_by_path(rel, lambda path: read_vector_index(str(path), mmap=True))
            except RuntimeError as e:
                raise IndexFormatError(f"{where}: cannot read FAISS index ({str(e).splitlines()[0]})") from e
        data = self._data(rel, force_verify=True)
        _check_faiss_header(data, where)
        try:
            return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as e:
            raise IndexFormatError(f"{where}: cannot read FAISS index ({str(e).splitlines()[0]})") from e

    def _read_with_lists(self, rel: str, lists: str, in_memory: bool) -> Any:
        from retrieval.index.ivf_lists import read_ondisk_index

        index_path, lists_path = self.path(rel), self.path(lists)  # both verified
        if index_path != self.root / rel or lists_path != self.root / lists:
            raise IndexFormatError(
                f"{self.root / rel}: replaced by a newer build while this index was open; open it again"
            )
        try:
            return read_ondisk_index(index_path, lists_path, in_memory=in_memory)
        except RuntimeError as e:
            raise IndexFormatError(f"{index_path}: cannot read FAISS index ({str(e).splitlines()[0]})") from e

    def read_sparse(self, rel: str, load: Callable[[Path], T]) -> T:
        """Load a sparse file (e.g. ``SparseRelativeIndex.load``) from the pinned, verified path.

        The loader comes from the caller: the store knows files, not what the ASIF stage keeps in them.
        A newer build may delete the file while this snapshot loads it by name; the load then runs
        again on the pinned descriptor.
        """
        return self._load_by_path(rel, load)

    def _load_by_path(self, rel: str, load: Callable[[Path], T]) -> T:
        """``load(path)`` of the pinned file ``rel``, again by its descriptor if a newer build deletes it meanwhile."""
        path = self.path(rel)
        try:
            return load(path)
        except Exception:
            if path != self.root / rel or path.exists():
                raise
        # a newer build deleted the file between the check in path() and the load: read it by its pinned descriptor
        return load(self.path(rel))

    def read_errors(self) -> list[dict[str, Any]]:
        """The rows of the errors file of this snapshot (empty when there is none)."""
        rel = self.manifest.get("errors_file", ERRORS_NAME)
        if rel not in self._fds:
            return []
        where = self.root / rel
        try:
            text = bytes(self._data(rel)).decode("utf-8")
        except UnicodeDecodeError as e:
            raise IndexFormatError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise IndexFormatError(f"{where}: line {number} is not JSON ({e})") from None
            if not isinstance(row, dict):
                raise IndexFormatError(f"{where}: line {number} is not a JSON object")
            rows.append(row)
        return rows

    def disk_bytes(self) -> int:
        """Bytes on disk of the files the manifest names."""
        return sum(int(meta["bytes"]) for meta in self.manifest.get("checksums", {}).values())


def _close_fds(fds: dict[str, int]) -> None:
    while fds:
        _, fd = fds.popitem()
        with contextlib.suppress(OSError):
            os.close(fd)


def _parse_npy(data: bytearray, where: Path) -> np.ndarray:
    """An array from ``.npy`` bytes, without a copy and without unpickling."""
    from numpy.lib import format as npy

    stream = io.BytesIO(data)
    try:
        version = npy.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(stream)
        else:
            loaded: np.ndarray = np.load(io.BytesIO(data), allow_pickle=False)
            return loaded
    except (OSError, ValueError, EOFError, SyntaxError, TypeError) as e:
        raise IndexFormatError(f"{where}: cannot read array ({e})") from e
    if dtype.hasobject:
        raise IndexFormatError(f"{where}: holds Python objects, which would need unpickling; refused")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    offset = stream.tell()
    if offset + count * dtype.itemsize != len(data):
        raise IndexFormatError(
            f"{where}: header says {shape} {dtype} ({count * dtype.itemsize} bytes of data), "
            f"the file holds {len(data) - offset}"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


_FLAT_FOURCCS = {b"IxFI": 0, b"IxF2": 1}  # IndexFlatIP, IndexFlatL2 and their metric


_FLAT_HEADER = 37  # fourcc, d:int32, ntotal:int64, 2 x int64, is_trained:bool, metric:int32


def _check_faiss_header(data: bytearray, where: Path) -> None:
    """For flat indexes, check the header against the size (other types: FAISS parses them after the sha256 check)."""
    fourcc = bytes(data[:4])
    if fourcc not in _FLAT_FOURCCS:
        return  # another index type: its sha256 matched the manifest, FAISS parses it
    if len(data) < _FLAT_HEADER + 8:
        raise IndexFormatError(f"{where}: truncated FAISS header")
    d = int.from_bytes(data[4:8], "little", signed=True)
    ntotal = int.from_bytes(data[8:16], "little", signed=True)
    trained, metric = data[32], int.from_bytes(data[33:37], "little", signed=True)
    words = int.from_bytes(data[37:45], "little", signed=False)
    if not (0 < d <= 1 << 16) or ntotal < 0 or trained > 1 or metric != _FLAT_FOURCCS[fourcc]:
        raise IndexFormatError(f"{where}: implausible FAISS header (d={d}, ntotal={ntotal}, metric={metric})")
    if words != d * ntotal or len(data) != _FLAT_HEADER + 8 + 4 * d * ntotal:
        raise IndexFormatError(
            f"{where}: FAISS header says {ntotal} vectors of dimension {d}, the file holds {len(data)} bytes"
        )
