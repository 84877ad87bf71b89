"""The index stage on Ray: IVF parts filled in parallel tasks, and index shards searched by one actor each.

Build (:class:`RayIndexBuild`): the driver trains the IVF index once on a sample (exactly as
the single-machine build does), Ray tasks fill trained empty copies with contiguous row
ranges under their global ids and write them to the build's work folder, and the driver
merges their lists, in memory or into one ``.ivfdata`` file for large indexes (see
:mod:`retrieval.index.ivf_lists`).

Search (:class:`RayShardedIndex`): one actor per index shard holds it memory-mapped and
answers its part of every query; actors are restarted by Ray when they die
(``max_restarts``) and their searches retried. The merge is :func:`retrieval.index.sharded.search_shards`.

Ray is imported only when a build or an open index asks for it (``retrieval[ray]``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.core.search import SearchKnobs
from retrieval.embed.ray_pipeline import RayOptions, ray_session
from retrieval.index.ivf_lists import (
    fill_range,
    merge_in_ram,
    merge_on_disk,
    shard_bounds,
)
from retrieval.index.sharded import Hits, ShardRange, search_shard, search_shards
from retrieval.index.source import VectorSource
from retrieval.index.vector_index import Exclusions, read_vector_index

ONDISK_MERGE_BYTES = 4 << 30  # merged lists larger than this go into one .ivfdata file, not RAM
MIN_PART_ROWS = 10_000  # fewer rows per Ray task cost more in scheduling than they save
SHARD_ACTOR_RESTARTS = 3


def _fill_part(trained: np.ndarray, rows: np.ndarray, first_id: int, path: str) -> str:
    """A Ray task: the trained index (serialised) filled with ``rows`` under global ids, written to ``path``."""
    import faiss

    part = fill_range(faiss.deserialize_index(trained), rows, first_id)
    scratch = f"{path}.{os.getpid()}.tmp"
    faiss.write_index(part, scratch)
    os.replace(scratch, path)
    return path


@dataclass
class RayIndexBuild:
    """How the write stage builds IVF indexes on Ray: ``parts`` tasks (None: one per CPU of the cluster,
    at least ``MIN_PART_ROWS`` rows each), part files under ``scratch`` (a folder every node sees),
    lists merged on disk above ``ondisk_from_bytes``."""

    options: RayOptions
    scratch: Path
    parts: int | None = None
    ondisk_from_bytes: int | None = None  # None: ONDISK_MERGE_BYTES
    part_counts: dict[str, int] = field(default_factory=dict)  # parts used per index, for the manifest

    def fill_parts(self, name: str, trained: Any, source: VectorSource) -> list[Path]:
        """Part files of ``trained`` filled with all rows of ``source`` (one Ray task per part), in row order."""
        import faiss

        folder = self.scratch / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        with ray_session(self.options) as ray:
            parts = self.parts or max(1, min(int(ray.cluster_resources().get("CPU", 1)), len(source) // MIN_PART_ROWS))
            bounds = shard_bounds(len(source), min(parts, len(source)))
            shared = ray.put(faiss.serialize_index(trained))
            task = ray.remote(num_cpus=1, max_retries=3)(_fill_part)
            futures = [
                task.remote(shared, source.take(np.arange(low, high)), low, str(folder / f"part-{n:05d}.index"))
                for n, (low, high) in enumerate(bounds)
            ]
            paths = [Path(p) for p in ray.get(futures)]
        self.part_counts[name] = len(paths)
        return paths

    def merges_on_disk(self, nbytes: int) -> bool:
        """Whether lists of about ``nbytes`` are merged into an ``.ivfdata`` file rather than in memory."""
        limit = self.ondisk_from_bytes if self.ondisk_from_bytes is not None else ONDISK_MERGE_BYTES
        return nbytes > limit

    def merge_in_ram(self, trained: Any, paths: Sequence[Path]) -> Any:
        import faiss

        return merge_in_ram(trained, [faiss.read_index(str(p)) for p in paths])

    def merge_on_disk(self, trained: Any, paths: Sequence[Path], lists_path: Path) -> Any:
        return merge_on_disk(trained, paths, lists_path)

    def finish(self, name: str) -> None:
        shutil.rmtree(self.scratch / name, ignore_errors=True)


class ShardActor:
    """A Ray actor holding one index shard, memory-mapped from the index directory."""

    def __init__(self, path: str) -> None:
        self.index = read_vector_index(path, mmap=True)

    def search(self, queries: np.ndarray, k: int, knobs: dict[str, int], deleted: np.ndarray) -> Hits:
        return search_shard(self.index, queries, k, SearchKnobs.from_json(knobs), deleted)

    def pid(self) -> int:
        return os.getpid()


class RayShardedIndex:
    """Index shards searched by one Ray actor each; a query fans out to all of them at once."""

    def __init__(
        self, paths: Sequence[str | Path], ranges: Sequence[ShardRange], options: RayOptions, actor_cpus: float = 1.0
    ) -> None:
        self.ranges = list(ranges)
        self.ntotal = sum(len(r) for r in self.ranges)
        self._session = contextlib.ExitStack()
        ray = self.ray = self._session.enter_context(ray_session(options))
        actor = ray.remote(
            num_cpus=actor_cpus, max_restarts=SHARD_ACTOR_RESTARTS, max_task_retries=SHARD_ACTOR_RESTARTS
        )(ShardActor)
        self.actors = [actor.remote(str(path)) for path in paths]

    def fan_out(self, queries: np.ndarray, k: int, knobs: SearchKnobs, deleted: list[np.ndarray]) -> list[Hits]:
        shared = self.ray.put(queries)
        futures = [
            a.search.remote(shared, k, knobs.to_json(), gone) for a, gone in zip(self.actors, deleted, strict=True)
        ]
        return list(self.ray.get(futures))

    def search(
        self,
        queries: np.ndarray,
        k: int,
        knobs: SearchKnobs = SearchKnobs(),
        exclude: Exclusions | None = None,
        rerank_with: VectorSource | None = None,
    ) -> Hits:
        """Top ``k`` over all shards, as the in-process :class:`~retrieval.index.sharded.ShardedIndex` answers."""
        return search_shards(self.fan_out, self.ranges, queries, k, knobs, exclude, rerank_with)

    def close(self) -> None:
        """Stop the shard actors (and the Ray session, if this searcher started it)."""
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
        self.actors = []
        self._session.close()
