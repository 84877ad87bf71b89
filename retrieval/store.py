"""The directory format shared by indexes and anchor sets (format v1).

A directory holds data files whose names carry a build id, and one
``manifest.json`` that names the files of the current build with their sizes
and sha256. The manifest is written last and atomically: it is the commit
point. A build killed half way leaves only unreferenced files behind, and the
previous manifest (and so the previous index) intact; the next successful
commit removes the leftovers, temporary files included.

Writers. One build at a time: :func:`retrieval.locking.writer_lock` holds an
``fcntl.flock`` on ``<dir>/.lock`` around a build, so a second writer fails at
once with ``IndexLockedError`` instead of deleting the first one's files.

Readers never take the lock. A commit deletes the files of the build it
replaces right away, so a reader must not depend on finding them by name
later. :class:`StoreReader` therefore *pins* its snapshot: when it opens a
directory it opens every file its manifest names (the build's list of skipped
items included: ``items/<build>-errors.jsonl``; the top-level ``errors.jsonl``
is a copy for people) and keeps the descriptors; all later reads go through
them. On POSIX a deleted file stays readable through an open descriptor, so a
reader keeps answering from the build it opened, consistently, however many
commits happen after (it sees the new build when it is opened again). The only race left is at
open time: a commit can land between reading the manifest and opening the
files; the reader then finds the manifest changed and starts over with the new
one. (Keeping old builds' files for a grace period was the alternative; it
only narrows the window, costs disk, and a slow reader can still lose.)

Untrusted files. Nothing is ever unpickled (``allow_pickle=False``; object
arrays are refused). Sizes are checked when a directory is opened; sha256
against the manifest's ``checksums`` when a file is read, on the very bytes
that are then parsed. FAISS and parquet files are parsed by native code, so
they are always verified (and a flat FAISS index's header is also checked
against its size before FAISS sees it); ``StoreReader(..., verify=False)``
skips hashing only the numpy files (``.npy``/``.npz``), which numpy parses in
Python and which can be large. The manifest carries ``manifest_sha256`` over
its own canonical JSON, so an edited or bit-flipped manifest is refused too
(a manifest without it, from before, is accepted). Every problem is an
``IndexFormatError`` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import stat
import time
import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .atomic import atomic_open, atomic_path, write_json_atomic
from .errors import IndexFormatError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
LOCK_NAME = ".lock"
WORK_NAME = ".work"  # progress shards of a build in progress (retrieval.resume); never in a manifest
VECTOR_CHUNK_ROWS = 65_536  # rows converted and written at a time
MAX_MANIFEST_BYTES = 64 << 20
_DATA_DIRS = ("items", "vectors", "faiss", "relative", "anchors")
_BUILD_ID = re.compile(r"b[0-9]{8}T[0-9]{6}-[0-9a-f]{6}")
_ROOT_TEMP = re.compile(r"^\.(manifest\.json|errors\.jsonl)\..+\.tmp$")
_SAFE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NUMPY_SUFFIXES = (".npy", ".npz")
_OPEN_PATIENCE_S = 10.0  # an open restarts while commits keep landing under it, for at most this long
_CHUNK = 1 << 24


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


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON, without its own ``manifest_sha256`` field."""
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def is_leftover_name(name: str) -> bool:
    """True for an entry a killed or finished build may leave at the top of an index directory.

    ``.work`` holds the progress shards of a resumable build (:mod:`retrieval.resume`);
    readers never look at it and :func:`remove_stale_files` leaves it alone.
    """
    return name in _DATA_DIRS or name in (ERRORS_NAME, LOCK_NAME, WORK_NAME) or bool(_ROOT_TEMP.match(name))


class StoreWriter:
    """Writes the files of one build; nothing becomes visible until :meth:`commit`.

    Hold :func:`retrieval.locking.writer_lock` on the directory around the whole build.
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
        with atomic_path(self.root / rel) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        return self._finish(rel)

    def write_vectors(self, space: str, kind: str, vectors: Any, first_shard: int = 0) -> list[str]:
        """Write L2-normalised vectors (a matrix or a ``VectorSource``) as one float16 shard, streamed in chunks.

        One contiguous file per build (``add`` appends further shards): FAISS can then
        re-rank from it in place (see ``faiss_views``), and a memory-mapped read is one map.
        """
        from .vector_index import as_source

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
        """Write the errors, then the manifest (the commit point); remove stale files.

        The skipped items go to ``items/<build>-errors.jsonl`` (checksummed and pinned like any data
        file, so readers always see the errors of the build they opened) and to a plain
        ``errors.jsonl`` copy at the top, for people.
        """
        errors = list(errors)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in errors)
        data = text.encode("utf-8", "backslashreplace")  # lone surrogates (undecodable file names) stay readable
        rel = f"items/{self.build_id}-errors.jsonl"
        with atomic_path(self.root / rel) as tmp:
            tmp.write_bytes(data)
        self._finish(rel)
        with atomic_open(self.root / ERRORS_NAME, "wb") as handle:
            handle.write(data)
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
        remove_stale_files(self.root, keep=set(self.files))
        return full


def remove_stale_files(root: Path, keep: set[str]) -> list[str]:
    """Delete data files of other builds (leftovers of killed builds or replaced ones) and temporary files.

    Only safe under the writer lock: another build's files in progress would go too.
    """
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
    for path in sorted(root.iterdir()):
        if _ROOT_TEMP.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


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
        deadline = time.monotonic() + _OPEN_PATIENCE_S
        while True:
            manifest = self.manifest = read_manifest(self.root, kind)
            try:
                self._pin(manifest)
            except _Unpinned as e:
                _close_fds(self._fds)
                changed = _current_build_id(self.root) != manifest.get("build_id")
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
            try:
                self._fds[ERRORS_NAME] = self._open(self.root / ERRORS_NAME, "")
            except _Unpinned:
                pass

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

    def __enter__(self) -> "StoreReader":
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
            block = os.pread(fd, min(_CHUNK, size - done), done)
            if not block:
                raise IndexFormatError(f"{self.root / rel}: shorter than expected while reading")
            buf[done : done + len(block)] = block
            done += len(block)
        return buf

    def _must_verify(self, rel: str) -> bool:
        if rel == ERRORS_NAME:  # the legacy top-level copy has no checksum
            return False
        return self.verify or not rel.endswith(_NUMPY_SUFFIXES)

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
        while block := os.pread(fd, _CHUNK, offset):
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
            path = self.path(rel)
            try:
                array = np.load(path, allow_pickle=False, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:
                raise IndexFormatError(f"{where}: cannot read array ({e})") from e
            return array
        return _parse_npy(self._data(rel), where)

    def vector_source(self, shards: list[str]) -> "VectorSource":  # noqa: F821
        """The float16 shards as one memory-mapped :class:`~retrieval.vector_index.VectorSource` (nothing loaded)."""
        from .vector_index import VectorSource

        parts = [self.read_array(rel, mmap=True) for rel in shards]
        for rel, part in zip(shards, parts):
            if part.ndim != 2 or not np.issubdtype(part.dtype, np.floating):
                raise IndexFormatError(f"{self.root / rel}: a {part.dtype} array of shape {part.shape}, expected vector rows")
        return VectorSource(parts)

    def read_vectors(self, shards: list[str]) -> np.ndarray:
        """Concatenate float16 shards into one float32 matrix."""
        parts = [self.read_array(rel) for rel in shards]
        if not parts:
            return np.zeros((0, 0), np.float32)
        for rel, part in zip(shards, parts):
            if part.ndim != 2 or part.shape[1] != parts[0].shape[1] or not np.issubdtype(part.dtype, np.floating):
                raise IndexFormatError(f"{self.root / rel}: a {part.dtype} array of shape {part.shape}, expected vector rows")
        return np.concatenate(parts).astype(np.float32)

    def read_table(self, rel: str) -> "pa.Table":  # noqa: F821
        """Load a parquet table (always verified: parquet is parsed by native code)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = self._data(rel, force_verify=True)
        try:
            return pq.read_table(pa.BufferReader(pa.py_buffer(data)))
        except (OSError, ValueError, pa.ArrowException) as e:
            raise IndexFormatError(f"{self.root / rel}: cannot read parquet ({e})") from e

    def read_faiss(self, rel: str, mmap: bool = False) -> Any:
        """Load a FAISS index file; its bytes are always verified (and a flat index's header checked) first.

        With ``mmap``, the file is hashed in a streaming pass and then memory-mapped
        (IVF lists stay on disk: an index larger than RAM remains searchable).
        """
        import faiss

        from .vector_index import read_vector_index

        where = self.root / rel
        if mmap:
            path = self.path(rel)
            try:
                return read_vector_index(str(path), mmap=True)
            except RuntimeError as e:
                raise IndexFormatError(f"{where}: cannot read FAISS index ({str(e).splitlines()[0]})") from e
        data = self._data(rel, force_verify=True)
        _check_faiss_header(data, where)
        try:
            return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as e:
            raise IndexFormatError(f"{where}: cannot read FAISS index ({str(e).splitlines()[0]})") from e

    def read_sparse(self, rel: str) -> Any:
        """Load a sparse relative index (``SparseRelativeIndex``) from the pinned file."""
        from .relative import SparseRelativeIndex

        return SparseRelativeIndex.load(self.path(rel))

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
        try:
            os.close(fd)
        except OSError:
            pass


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
            return np.load(io.BytesIO(data), allow_pickle=False)
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


def _current_build_id(root: Path) -> Any:
    try:
        with open(root / MANIFEST_NAME, encoding="utf-8") as handle:
            return json.loads(handle.read(MAX_MANIFEST_BYTES)).get("build_id")
    except (OSError, ValueError, AttributeError):
        return None


def _check_rel(rel: object, path: Path) -> None:
    parts = rel.split("/") if isinstance(rel, str) else []
    if not parts or not all(_SAFE_PART.match(part) and part not in (".", "..") for part in parts):
        raise IndexFormatError(f"{path}: names an unsafe file path {rel!r}; refused")


def _check_structure(manifest: dict[str, Any], path: Path) -> None:
    """The checksums are well formed, name only files inside the directory, and cover every file named."""
    checksums = manifest.get("checksums")
    if not isinstance(checksums, dict):
        raise IndexFormatError(f"{path}: no checksums; rebuild the index")
    for rel, meta in checksums.items():
        _check_rel(rel, path)
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("bytes"), int)
            or meta["bytes"] < 0
            or not isinstance(meta.get("sha256"), str)
            or not _SHA256.match(meta["sha256"])
        ):
            raise IndexFormatError(f"{path}: bad checksum entry for {rel!r}")
    stack: list[Any] = [manifest.get("files", {}), manifest.get("errors_file")]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            if node not in checksums:
                raise IndexFormatError(f"{path}: names {node!r}, which has no checksum; rebuild the index")
        elif node is not None:
            raise IndexFormatError(f"{path}: bad entry {node!r} under 'files'")


def read_manifest(root: Path, kind: str) -> dict[str, Any]:
    """Read and check ``manifest.json`` of an index or anchor directory."""
    path = root / MANIFEST_NAME
    if not root.exists():
        raise IndexFormatError(f"{root}: no such {kind} directory")
    if not path.is_file():
        raise IndexFormatError(f"{root}: not a {kind} directory (no {MANIFEST_NAME}); build one first")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise IndexFormatError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{path}: manifest is not a JSON object")
    if manifest.get("format") != FORMAT_VERSION:
        raise IndexFormatError(f"{path}: format {manifest.get('format')!r}, this version reads format {FORMAT_VERSION}")
    if manifest.get("kind") != kind:
        raise IndexFormatError(f"{path}: this is a {manifest.get('kind')!r} directory, expected {kind!r}")
    if "manifest_sha256" in manifest and manifest_digest(manifest) != manifest["manifest_sha256"]:
        raise IndexFormatError(f"{path}: the manifest does not match its own checksum (damaged or edited); rebuild the index")
    _check_structure(manifest, path)
    return manifest


def directory_exists(root: str | Path) -> bool:
    """True when ``root`` holds a committed manifest."""
    return os.path.isfile(Path(root) / MANIFEST_NAME)
