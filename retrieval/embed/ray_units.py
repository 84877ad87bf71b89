"""Work units of a distributed build, without Ray: cutting, embedding one unit, assembling.

A *unit* is a run of positions ``[start, stop)`` of a collection's image list: one per
source shard (the tar or parquet file the items come from), or per ``unit_size`` loose
files. A unit's output is a progress shard of :mod:`retrieval.embed.resume` (same format,
same checksum, written atomically), in the work folder of the index under a key that names
the job and the cut, so a rerun of the same command finds the units already done and
submits only the others. :mod:`retrieval.embed.ray_pipeline` runs the units on Ray.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.embed.pipeline import (
    EmbeddedImages,
    EmbedOptions,
    ImageRow,
    embed_images,
)
from retrieval.embed.resume import Shard, job_key
from retrieval.sources.items import ImageRef, ItemError

DEFAULT_UNIT_SIZE = 1024  # loose image files per unit


@dataclass(frozen=True)
class Unit:
    """Positions ``[start, stop)`` of the image list, embedded as one task."""

    start: int
    stop: int


def cut_units(refs: Sequence[ImageRef], unit_size: int = DEFAULT_UNIT_SIZE) -> list[Unit]:
    """One unit per source shard (consecutive items whose opener reads one container file: a
    tar member, a parquet cell), and one per ``unit_size`` consecutive other items (files)."""
    if unit_size < 1:
        raise ValueError(f"unit_size must be >= 1, got {unit_size}")
    units: list[Unit] = []
    start = 0

    def container(ref: ImageRef) -> str | None:
        path = getattr(ref.opener, "path", None) if ref.opener is not None else None
        return str(path) if path is not None else None

    for shard, run in itertools.groupby(refs, key=container):
        count = len(list(run))
        step = count if shard is not None else unit_size
        for offset in range(0, count, step):
            units.append(Unit(start + offset, start + min(offset + step, count)))
        start += count
    return units


def units_key(refs: Sequence[ImageRef], encoder: Any, batch_size: int, units: Sequence[Unit]) -> str:
    """The work-folder key of a distributed job: the single-machine job's key (encoder, code,
    versions, preprocessing, batch size, items) plus the cut into units."""
    base = job_key(refs, encoder, batch_size, encoder.image_transform(), getattr(encoder, "draft_size", None))
    digest = hashlib.sha256(f"ray-units|{base}|".encode())
    digest.update(np.asarray([(u.start, u.stop) for u in units], dtype="<i8").tobytes())
    return digest.hexdigest()[:32]


def embed_unit(refs: Sequence[ImageRef], unit: Unit, encoder: Any, batch_size: int) -> Shard:
    """Decode and embed the images of ``unit`` (``refs`` are exactly its items) into a shard;
    an unreadable image is a failed row of the shard, never an exception."""
    if len(refs) != unit.stop - unit.start:
        raise ValueError(f"unit {unit.start}..{unit.stop} got {len(refs)} items")
    options = EmbedOptions(batch_size=batch_size, workers=0, replicas=False, progress=False, progress_shard_size=0)
    done = embed_images(refs, encoder, options)
    local = {id(ref): i for i, ref in enumerate(refs)}
    ok = [(unit.start + local[id(row.ref)], row.width, row.height, row.sha256) for row in done.rows]
    embedded = {position for position, _, _, _ in ok}
    skipped = [p for p in range(unit.start, unit.stop) if p not in embedded]  # the errors come in position order
    if len(skipped) != len(done.errors):
        raise RuntimeError(
            f"unit {unit.start}..{unit.stop}: {len(skipped)} images not embedded but {len(done.errors)} errors"
        )
    failed = [(p, error.reason) for p, error in zip(skipped, done.errors, strict=True)]
    return Shard(unit.start, unit.stop, ok, failed, np.ascontiguousarray(done.vectors, dtype=np.float32))


def assemble(refs: Sequence[ImageRef], shards: Sequence[Shard], dim: int, **stats: Any) -> EmbeddedImages:
    """The units' shards as one result in the collection's order (rows, vectors, errors)."""
    covered = np.zeros(len(refs), bool)
    vectors = np.zeros((len(refs), dim), np.float32)
    meta: dict[int, tuple[int, int, str]] = {}
    failures: dict[int, str] = {}
    for shard in shards:
        covered[shard.start : shard.stop] = True
        for row, (position, width, height, sha) in enumerate(shard.ok):
            vectors[position] = shard.vectors[row]  # type: ignore[index]
            meta[position] = (width, height, sha)
        failures.update(shard.failed)
    if not covered.all():
        missing = np.flatnonzero(~covered)
        raise RuntimeError(f"{len(missing)} images have no unit output (first: {refs[int(missing[0])].location})")
    keep = sorted(meta)
    rows = [ImageRow(refs[p], *meta[p]) for p in keep]
    errors = [ItemError(path=refs[p].location, reason=failures[p], kind="image") for p in sorted(failures)]
    return EmbeddedImages(rows=rows, vectors=vectors[np.asarray(keep, dtype=np.int64)], errors=errors, **stats)
