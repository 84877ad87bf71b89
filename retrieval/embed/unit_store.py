"""Where the work units of a distributed build are kept: a path every node sees, or an fsspec URL.

Without a work location the units are the index's own progress shards
(:class:`retrieval.embed.resume.WorkFolder`, ``<index>/.work/<key>/``). With one (``--work-dir``:
a shared path, ``file:///...``, ``s3://bucket/prefix`` with ``s3fs`` installed, ``gs://`` with
``gcsfs``, ``memory://`` in tests) they are ``<location>/<key>/shard-<start>-<stop>.npz``, in the
same format with the same checksum, written atomically through fsspec: on an object store a
single put (atomic there), elsewhere a temporary name beside the target, then a rename. A
damaged or foreign file is never trusted: it is removed and its unit embedded again.
"""

from __future__ import annotations

import io
import logging
import uuid
from pathlib import Path
from typing import Any

from retrieval.core.errors import InputError
from retrieval.embed.resume import Shard, WorkFolder, read_shard, shard_bytes

log = logging.getLogger(__name__)

# Object stores: a single put is atomic and a rename is a copy, so a unit is written with one put.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})


def is_url(location: str | Path) -> bool:
    """Whether ``location`` is an fsspec URL (``scheme://...``) rather than a plain path."""
    return isinstance(location, str) and "://" in location


def _filesystem(location: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise InputError(f"{location}: a work URL needs fsspec (pip install 'retrieval[ray]')") from None
    try:
        return fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as e:  # an unknown scheme, or its package (s3fs, gcsfs) missing
        raise InputError(f"{location}: cannot open this work location ({e})") from None


class UnitStore:
    """The unit outputs of one job under ``location`` (a path or an fsspec URL)."""

    def __init__(self, location: str | Path, key: str, count: int, dim: int) -> None:
        self.location = str(location)
        self.fs, root = _filesystem(self.location if is_url(self.location) else Path(location).resolve().as_posix())
        self.folder = f"{root.rstrip('/')}/{key}"
        self.key, self.count, self.dim = key, count, dim
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.single_put = bool(OBJECT_STORES.intersection(protocols))

    def load(self) -> list[Shard]:
        """The complete, valid, non-overlapping units, by start; damaged ones are removed."""
        if not self.fs.isdir(self.folder):
            return []
        shards: list[Shard] = []
        for path in sorted(self.fs.ls(self.folder, detail=False)):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith("shard-"):
                continue  # a temporary name of a write cut short, or someone else's file
            try:
                shard = read_shard(name, io.BytesIO(self.fs.cat_file(path)), self.key, self.count, self.dim)
            except Exception as e:  # anything wrong with a unit costs its images, never the build
                log.warning("ignoring damaged work unit %s (%s); its images are embedded again", path, e)
                self.fs.rm(path)
                continue
            if shards and shard.start < shards[-1].stop:
                log.warning("ignoring overlapping work unit %s", path)
                self.fs.rm(path)
                continue
            shards.append(shard)
        return shards

    def write(self, shard: Shard) -> None:
        """Write one unit atomically: readers see the whole file or none."""
        data = shard_bytes(shard, self.key, self.dim)
        target = f"{self.folder}/{shard.name}"
        if self.single_put:
            self.fs.pipe_file(target, data)
            return
        self.fs.makedirs(self.folder, exist_ok=True)
        tmp = f"{self.folder}/.{shard.name}.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(tmp, data)
        try:
            self.fs.mv(tmp, target)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def remove(self) -> None:
        """Delete this job's folder (its units are safe elsewhere)."""
        if self.fs.exists(self.folder):
            self.fs.rm(self.folder, recursive=True)


def open_units(
    location: str | Path | None, index: str | Path, key: str, count: int, dim: int
) -> WorkFolder | UnitStore:
    """The store of a job's units: ``location`` (a path or URL), else the index's work folder."""
    if location is None:
        return WorkFolder(index, key, count, dim)
    return UnitStore(location, key, count, dim)
