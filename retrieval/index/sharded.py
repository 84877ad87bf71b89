"""Sharded search: an index split into index shards over contiguous row ranges, searched shard by shard.

A query goes to every shard; each returns its top hits (positions shifted to the whole
collection's), and the best ``k`` of them all are kept, ties broken by the smaller position.
Shards of an IVF index share its trained quantizer (see :func:`retrieval.index.ivf_lists.split_index`),
so "the same knobs" means the same ``nprobe`` in every shard: each shard probes the very lists
the whole index would, and the merged top-k equals the whole index's. With re-ranking (``ivfpq``)
every shard contributes its own shortlist of ``k x rerank_factor``, a superset of the whole
index's, re-ranked exactly here: results are the whole index's or better, not always identical.

:class:`ShardedIndex` searches in this process; a Ray searcher with one actor per shard
(:mod:`retrieval.index.ray_shards`) answers through the same :func:`search_shards` merge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.core.search import SearchKnobs
from retrieval.index.source import VectorSource
from retrieval.index.spec import DEFAULT_RERANK_FACTOR
from retrieval.index.vector_index import Exclusions, rerank
from retrieval.index.vector_index import search as vector_search

Hits = tuple[np.ndarray, np.ndarray]  # (scores, positions), each (q, k')
FanOut = Callable[[np.ndarray, int, SearchKnobs, list[np.ndarray]], list[Hits]]


@dataclass(frozen=True)
class ShardRange:
    """Rows ``start`` (inclusive) to ``stop`` (exclusive) of the collection, held by one index shard."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def merge_top_k(scores: Sequence[np.ndarray], positions: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of several (q, k_i) hit lists per query: higher score first, ties by smaller position, -1 last."""
    all_scores = np.concatenate([np.asarray(s, np.float32) for s in scores], axis=1)
    all_positions = np.concatenate([np.asarray(p, np.int64) for p in positions], axis=1)
    keyed = np.where(all_positions < 0, -np.inf, all_scores)
    order = np.lexsort((np.where(all_positions < 0, np.iinfo(np.int64).max, all_positions), -keyed), axis=1)[:, :k]
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_positions, order, axis=1)


def local_exclusions(exclude: Exclusions | None, shard: ShardRange) -> Exclusions | None:
    """The deleted positions inside ``shard``, renumbered from its first row."""
    if exclude is None or not len(exclude):
        return None
    inside = exclude.positions[(exclude.positions >= shard.start) & (exclude.positions < shard.stop)]
    return Exclusions(inside - shard.start, len(shard)) if len(inside) else None


def search_shards(
    fan_out: FanOut,
    ranges: Sequence[ShardRange],
    queries: np.ndarray,
    k: int,
    knobs: SearchKnobs,
    exclude: Exclusions | None = None,
    rerank_with: VectorSource | None = None,
) -> Hits:
    """The whole collection's top ``k`` (scores, positions) from its shards.

    ``fan_out(queries, k, knobs, deleted)`` searches every shard (``deleted``: each shard's deleted
    local positions) and returns each shard's hits in local positions. With ``rerank_with`` every
    shard returns a shortlist of ``k x rerank_factor``, scored exactly here.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    deleted = exclude.positions if exclude is not None else np.zeros(0, np.int64)
    k = min(int(k), sum(len(r) for r in ranges) - len(deleted))
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    fetch = k * (knobs.rerank_factor or DEFAULT_RERANK_FACTOR) if rerank_with is not None else k
    local = [local_exclusions(exclude, shard) for shard in ranges]
    found = fan_out(queries, fetch, knobs, [e.positions if e is not None else np.zeros(0, np.int64) for e in local])
    scores = [hits[0] for hits in found]
    positions = [np.where(hits[1] >= 0, hits[1] + shard.start, -1) for hits, shard in zip(found, ranges, strict=True)]
    if rerank_with is not None:
        exact_scores, exact = rerank(queries, np.concatenate(positions, axis=1), rerank_with)
        return exact_scores[:, :k], exact[:, :k]
    return merge_top_k(scores, positions, k)


def search_shard(shard: Any, queries: np.ndarray, k: int, knobs: SearchKnobs, deleted: np.ndarray) -> Hits:
    """One shard's top ``k`` in its local positions, its ``deleted`` positions left out."""
    exclude = Exclusions(deleted, int(shard.ntotal)) if len(deleted) else None
    return vector_search(shard, queries, k, knobs, exclude)


class ShardedIndex:
    """Index shards searched one after another in this process (always available, Ray or not)."""

    def __init__(self, shards: Sequence[Any], ranges: Sequence[ShardRange]) -> None:
        if len(shards) != len(ranges) or any(s.ntotal != len(r) for s, r in zip(shards, ranges, strict=True)):
            raise ValueError("each index shard must hold exactly the rows of its range")
        self.shards = list(shards)
        self.ranges = list(ranges)
        self.d = int(self.shards[0].d)
        self.ntotal = sum(len(r) for r in self.ranges)

    def fan_out(self, queries: np.ndarray, k: int, knobs: SearchKnobs, deleted: list[np.ndarray]) -> list[Hits]:
        return [search_shard(shard, queries, k, knobs, gone) for shard, gone in zip(self.shards, deleted, strict=True)]

    def search(
        self,
        queries: np.ndarray,
        k: int,
        knobs: SearchKnobs = SearchKnobs(),
        exclude: Exclusions | None = None,
        rerank_with: VectorSource | None = None,
    ) -> Hits:
        """Top ``k`` over all shards, as :func:`retrieval.index.vector_index.search` answers for one index."""
        return search_shards(self.fan_out, self.ranges, queries, k, knobs, exclude, rerank_with)

    def close(self) -> None:
        """Nothing to release in this process (the Ray searcher stops its actors)."""
