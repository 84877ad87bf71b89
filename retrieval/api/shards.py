"""Opening the index shards of a sharded vector index: in this process, or one Ray actor per shard."""

from __future__ import annotations

from typing import Any

from retrieval.core.errors import IndexFormatError
from retrieval.index.sharded import ShardedIndex, ShardRange
from retrieval.store.reader import StoreReader


def ray_options_of(ray: Any) -> Any:
    """``ray`` (``local``, ``auto``, an address, or RayOptions) as RayOptions; None stays None."""
    if ray is None:
        return None
    from retrieval.embed.ray_pipeline import RayOptions

    return ray if isinstance(ray, RayOptions) else RayOptions(address=str(ray))


def shard_ranges(record: dict[str, Any] | None, count: int, where: str) -> list[ShardRange]:
    """The row ranges of ``count`` index shards recorded in a vector index's manifest record, checked."""
    bounds = (record or {}).get("shards")
    if not isinstance(bounds, list) or len(bounds) != count:
        raise IndexFormatError(
            f"{where}: {count} index shards but no matching 'shards' ranges in the manifest; rebuild the index"
        )
    ranges = []
    for bound in bounds:
        if not (isinstance(bound, list) and len(bound) == 2 and all(isinstance(v, int) for v in bound)):
            raise IndexFormatError(f"{where}: bad index shard range {bound!r}")
        ranges.append(ShardRange(*bound))
    if (
        ranges[0].start != 0
        or any(a.stop != b.start or len(a) <= 0 for a, b in zip(ranges, ranges[1:], strict=False))
        or len(ranges[-1]) <= 0
    ):
        raise IndexFormatError(f"{where}: index shard ranges {bounds} do not cover the rows in order")
    return ranges


def open_shards(store: StoreReader, rels: list[str], record: dict[str, Any] | None, mmap: bool, ray: Any = None) -> Any:
    """A searcher over the index shards ``rels``: :class:`ShardedIndex` here, or with ``ray`` (RayOptions)
    a :class:`~retrieval.index.ray_shards.RayShardedIndex` whose actors map the (verified) shard files."""
    ranges = shard_ranges(record, len(rels), str(store.root))
    if ray is not None:
        from retrieval.index.ray_shards import RayShardedIndex

        return RayShardedIndex([store.path(rel) for rel in rels], ranges, ray)
    shards = [store.read_faiss(rel, mmap=mmap) for rel in rels]
    for rel, shard, bound in zip(rels, shards, ranges, strict=True):
        if shard.ntotal != len(bound):
            raise IndexFormatError(
                f"{store.root / rel}: {shard.ntotal} vectors, its range holds {len(bound)}; rebuild the index"
            )
    return ShardedIndex(shards, ranges)
