"""Resumable embedding: progress shards in a work folder inside the index directory.

A long image build writes what it has embedded every ``progress_shard_size`` images
as one *progress shard*; killed (even with SIGKILL) and started again with the same
command, it loads the complete shards and embeds only the rest. Layout::

    <index>/.work/<key>/shard-<start:010d>-<stop:010d>.npz

``key`` identifies the job: the encoder (spec, weights fingerprint, dimension, device,
numerics such as int8 Linear layers or bfloat16 autocast), how it runs (encoder replicas
in the workers, ``torch.compile``: other arithmetic, last bits that differ), its
preprocessing (the transform's class and settings, the decode draft size), the
versions of this package, torch and Pillow, the sha256 of the source files that decode,
preprocess and encode (an edit there gives a new key), the batch size (a resumed run
forms the same batches, so its vectors are bit-identical to an uninterrupted run's),
and the ordered list of items: a file's path with its size and modification time, an
item read through an opener its uri and the version it declares (nothing is opened or
stat'ed). Any change gives another key, so stale work is never reused.

A shard covers the positions ``[start, stop)`` of the image list: the float32
vectors of the images that were embedded, their width, height and sha256, and the
reason for each one that was skipped. It is written atomically
(:mod:`retrieval.core.atomic`) by one background thread (a bounded queue, so a slow
disk never holds more than a few shards in memory and never stalls the encoder
until that queue is full), and carries a sha256 over its own contents:
a truncated, damaged or inconsistent shard is ignored (its images are embedded
again), never trusted.

Readers never look at ``.work``: it is not named by the manifest and the store's
stale-file cleanup leaves it alone; the build removes it after its commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import re
import shutil
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.core.atomic import atomic_path
from retrieval.core.errors import RetrievalError

log = logging.getLogger(__name__)

WORK_FORMAT = 1
DEFAULT_PROGRESS_SHARD_SIZE = 4096
PROGRESS_SHARD_ENV = "RETRIEVAL_PROGRESS_SHARD_SIZE"
_SHARD_NAME = re.compile(r"^shard-([0-9]{10})-([0-9]{10})\.npz$")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_QUEUE_SHARDS = 2  # shards waiting for the writer; a third submit waits for the disk


class ProgressWriteError(RetrievalError):
    """A progress shard could not be written (disk full, permissions...)."""


WORK_NAME = ".work"  # the folder of progress shards inside an index directory; never named in a manifest


def work_root(index: str | Path) -> Path:
    """The work folder of an index directory (all jobs)."""
    return Path(index) / WORK_NAME


def remove_work(index: str | Path) -> None:
    """Delete the work folder of ``index`` (after a successful commit, under the writer lock)."""
    root = work_root(index)
    if root.is_dir() and not root.is_symlink():
        shutil.rmtree(root, ignore_errors=True)
        if root.exists():
            log.warning("could not remove the work folder %s; delete it by hand", root)
    elif root.is_symlink() or root.is_file():
        root.unlink(missing_ok=True)


def _file_state(path: Path) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def describe_transform(transform: Any) -> str:
    """A stable text for a preprocessing callable: its class and settings, without memory addresses."""
    kind = type(transform)
    text = _ADDRESS.sub("", repr(transform))
    settings = {
        name: value
        for name, value in sorted(getattr(transform, "__dict__", {}).items())
        if isinstance(value, (bool, int, float, str, tuple, list, type(None)))
    }
    return f"{kind.__module__}.{kind.__qualname__}|{text}|{_ADDRESS.sub('', repr(settings))}"


def _code_digest(*objects: Any) -> dict[str, str | None]:
    """sha256 (16 hex) of the source files defining ``objects``: code that shapes the vectors."""
    out: dict[str, str | None] = {}
    for obj in objects:
        name = getattr(obj, "__module__", None) or type(obj).__module__
        module = sys.modules.get(name)
        try:
            out[name] = hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:16]  # type: ignore[union-attr, arg-type]
        except (AttributeError, TypeError, OSError):
            out[name] = None
    return out


def job_key(
    items: Sequence[Any],
    encoder: Any,
    batch_size: int,
    transform: Any,
    draft_size: Any = None,
    *,
    replicas: bool = False,
    compile: bool = False,
    decode: str | None = None,
) -> str:
    """A hex key naming one embedding job (see the module docstring for what it covers).

    ``items``: ``ImageRef`` objects (their ``resume_state``), or file paths.
    """
    import PIL
    import torch

    from retrieval.core.version import __version__
    from retrieval.sources.items import load_image

    digest = hashlib.sha256()
    head = {
        "work_format": WORK_FORMAT,
        "versions": [__version__, torch.__version__, PIL.__version__],
        "code": _code_digest(load_image, type(transform), type(encoder)),
        "spec": encoder.spec,
        "fingerprint": encoder.fingerprint(),
        "dim": int(encoder.dim),
        "device": str(encoder.device),
        "numerics": str(getattr(encoder, "numerics", None)),
        "replicas": bool(replicas),
        "compile": bool(compile),
        "transform": describe_transform(transform),
        "draft_size": list(draft_size) if draft_size is not None else None,
        "batch_size": int(batch_size),
        "count": len(items),
    }
    if decode is not None:  # the batched JPEG decode's device (absent for the CPU path: older keys stay valid)
        head["decode"] = decode
    digest.update(json.dumps(head, sort_keys=True).encode() + b"\n")
    for item in items:
        state = item.resume_state() if hasattr(item, "resume_state") else [str(item), _file_state(Path(item))]
        # ensure_ascii keeps undecodable names (lone surrogates) hashable
        digest.update(json.dumps(state).encode() + b"\n")
    return digest.hexdigest()[:32]


@dataclass
class Shard:
    """What was learnt about the images at positions ``[start, stop)``."""

    start: int
    stop: int
    ok: list[tuple[int, int, int, str]] = field(default_factory=list)  # (position, width, height, sha256)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)
    vectors: np.ndarray | None = None  # (len(ok), dim) float32, in the order of ``ok``

    @property
    def name(self) -> str:
        return f"shard-{self.start:010d}-{self.stop:010d}.npz"


def _digest(meta: bytes, vectors: np.ndarray) -> bytes:
    digest = hashlib.sha256(meta)
    digest.update(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
    return digest.digest()


class WorkFolder:
    """The progress shards of one job: loading the complete ones, writing new ones in the background."""

    def __init__(
        self, index: str | Path, key: str, count: int, dim: int, shard_size: int = DEFAULT_PROGRESS_SHARD_SIZE
    ) -> None:
        self.folder = work_root(index) / key
        self.key = key
        self.count = count
        self.dim = dim
        self.shard_size = shard_size  # positions per shard a writer fills before submitting it
        self._queue: queue.Queue[Shard | None] = queue.Queue(maxsize=_QUEUE_SHARDS)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.written = 0

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> list[Shard]:
        """The complete, valid, non-overlapping shards, by start; damaged ones are removed."""
        if not self.folder.is_dir():
            return []
        for tmp in self.folder.glob(".*.tmp"):  # a write cut short by a kill
            tmp.unlink(missing_ok=True)
        shards: list[Shard] = []
        for path in sorted(self.folder.glob("shard-*.npz")):
            try:
                shard = self._read(path)
            except Exception as e:  # anything wrong with a shard costs its images, never the build
                log.warning("ignoring damaged progress shard %s (%s); its images are embedded again", path, e)
                path.unlink(missing_ok=True)
                continue
            if shards and shard.start < shards[-1].stop:
                log.warning("ignoring overlapping progress shard %s", path)
                path.unlink(missing_ok=True)
                continue
            shards.append(shard)
        return shards

    def _read(self, path: Path) -> Shard:
        return read_shard(path.name, path, self.key, self.count, self.dim)

    # -- writing -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background writer (after any DataLoader workers were forked)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="progress-shard-writer", daemon=True)
        self._thread.start()

    def submit(self, shard: Shard) -> None:
        """Queue a shard for writing; waits only while the queue is full. Raises a writer error."""
        self._raise_error()
        while True:
            try:
                self._queue.put(shard, timeout=0.5)
                return
            except queue.Full:
                self._raise_error()

    def close(self) -> None:
        """Wait for the queued shards to be written; raise if any write failed."""
        self._finish()
        self._raise_error()

    def abort(self) -> None:
        """Write what is queued (complete work, useful to the next run) and stop; never raises."""
        with contextlib.suppress(BaseException):
            self._finish()

    def _finish(self) -> None:
        if self._thread is None:
            return
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._thread = None

    def _raise_error(self) -> None:
        if self._error is not None:
            error = self._error
            raise ProgressWriteError(
                f"{self.folder}: cannot write a progress shard ({type(error).__name__}: {error})"
            ) from error

    def _run(self) -> None:
        while True:
            shard = self._queue.get()
            if shard is None:
                return
            if self._error is not None:
                continue  # drain: keep the producer from blocking on a full queue
            try:
                self._write(shard)
                self.written += 1
            except BaseException as e:  # surfaced in the encoding thread at its next submit/close
                self._error = e

    def write(self, shard: Shard) -> None:
        """Write one shard now, atomically, in the calling thread (a unit of a distributed build)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write(shard)

    def _write(self, shard: Shard) -> None:
        data = shard_bytes(shard, self.key, self.dim)
        with atomic_path(self.folder / shard.name) as tmp:
            tmp.write_bytes(data)


def shard_bytes(shard: Shard, key: str, dim: int) -> bytes:
    """The file contents of ``shard`` of job ``key`` (an ``.npz`` carrying its own sha256)."""
    vectors = np.ascontiguousarray(
        shard.vectors if shard.vectors is not None else np.zeros((0, dim), np.float32), dtype="<f4"
    )
    meta = json.dumps(
        {
            "format": WORK_FORMAT,
            "key": key,
            "start": shard.start,
            "stop": shard.stop,
            "ok": [list(row) for row in shard.ok],
            "failed": [list(row) for row in shard.failed],
        },
        ensure_ascii=True,
    ).encode("ascii")
    buffer = io.BytesIO()
    np.savez(
        buffer,
        meta=np.frombuffer(meta, np.uint8),
        vectors=vectors,
        digest=np.frombuffer(_digest(meta, vectors), np.uint8),
    )
    return buffer.getvalue()


def read_shard(name: str, source: Any, key: str, count: int, dim: int) -> Shard:
    """The shard in ``source`` (a path or a binary file object) named ``name``, checked against
    the job (``key``, ``count`` images, ``dim``); ValueError (or an I/O error) when it is not valid."""
    match = _SHARD_NAME.match(name)
    if not match:
        raise ValueError("unexpected name")
    start, stop = int(match.group(1)), int(match.group(2))
    if not 0 <= start < stop <= count:
        raise ValueError(f"positions {start}..{stop} outside 0..{count}")
    with np.load(source, allow_pickle=False) as data:
        meta_bytes = data["meta"].tobytes()
        vectors = np.array(data["vectors"])
        digest = data["digest"].tobytes()
    if vectors.dtype != np.dtype("<f4"):
        raise ValueError(f"vectors are {vectors.dtype}, expected float32")
    if _digest(meta_bytes, vectors) != digest:
        raise ValueError("checksum mismatch")
    meta = json.loads(meta_bytes.decode("utf-8"))
    if meta.get("format") != WORK_FORMAT or meta.get("key") != key:
        raise ValueError("written for another job")
    if meta.get("start") != start or meta.get("stop") != stop:
        raise ValueError("positions do not match the file name")
    ok = [(int(p), int(w), int(h), str(s)) for p, w, h, s in meta["ok"]]
    failed = [(int(p), str(r)) for p, r in meta["failed"]]
    covered = sorted([row[0] for row in ok] + [row[0] for row in failed])
    if covered != list(range(start, stop)):
        raise ValueError("does not cover its positions exactly once")
    if vectors.shape != (len(ok), dim) or not np.isfinite(vectors).all():
        raise ValueError(f"vectors of shape {vectors.shape}, expected ({len(ok)}, {dim})")
    return Shard(start, stop, ok, failed, vectors)
