"""Near-duplicate images of an index, and near-duplicates collapsed out of search results.

Both compare the items' stored vectors in their own encoder space (CLIP: the shared space; ASIF:
the image encoder's own space, e.g. EfficientNet-Lite0's, where re-encoded, resized and cropped
copies of a photo score >= 0.86 and distinct COCO photos <= 0.64; the ASIF relative space is less
clean). One rule, :func:`retrieval.index.dedup.greedy_keep`, serves queries (``dedup=``, ``--dedup``)
and the HTTP server's ``deduplicate`` flag: a result is dropped when its cosine to a better result
already kept is >= the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from retrieval.index.dedup import (
    check_threshold,
    greedy_keep,
    groups_of,
    near_duplicate_pairs,
    unit_rows,
)

DEFAULT_THRESHOLD = 0.8  # cosine; tuned on the COCO photos with planted copies (see the module docstring)


@dataclass(frozen=True)
class DuplicateItem:
    """An image of a duplicate group; ``similarity``: its cosine to the group's keeper (1 for the keeper)."""

    id: str
    uri: str
    width: int
    height: int
    position: int
    similarity: float


@dataclass(frozen=True)
class DuplicateGroup:
    """Near-identical images: the suggested ``keeper`` (most pixels, then the earliest added) and the others."""

    keeper: DuplicateItem
    duplicates: list[DuplicateItem]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stored_vectors(index: Any, kind: str, positions: Sequence[int] | np.ndarray) -> np.ndarray:
    """The stored vectors of ``kind`` items at ``positions``, in the items' own encoder space (float32)."""
    key = f"{index.manifest['spaces'][kind]}/{kind}"
    vectors: np.ndarray = index.vector_source(key).take(np.asarray(positions, dtype=np.int64).reshape(-1))
    return vectors


def distinct(index: Any, kind: str, positions: Sequence[int] | np.ndarray, threshold: float) -> list[int]:
    """Indices into ``positions`` (a ranked result, best first) that stay once near-duplicates are collapsed."""
    if len(positions) < 2:
        return list(range(len(positions)))
    return greedy_keep(stored_vectors(index, kind, positions), threshold)


def duplicates(index: Any, threshold: float = DEFAULT_THRESHOLD) -> list[DuplicateGroup]:
    """Groups of near-identical live images (cosine >= ``threshold`` joins two; chains join), by range search
    over the stored image vectors in blocks; groups ordered by their keeper's position."""
    threshold = check_threshold(threshold)
    rows = index.rows("image")
    if index.manifest["counts"]["image"] == 0:
        return []
    key = f"{index.manifest['spaces']['image']}/image"
    source = index.vector_source(key)
    pairs = near_duplicate_pairs(lambda start, stop: source.take(np.arange(start, stop)), rows, threshold)
    deleted = index.deleted("image")
    if len(deleted) and len(pairs):
        pairs = pairs[~np.isin(pairs, deleted).any(axis=1)]
    table = index.items("image")
    return [_group(table, members, unit_rows(source.take(np.asarray(members)))) for members in groups_of(pairs, rows)]


def _group(table: dict[str, list[Any]], members: list[int], vectors: np.ndarray) -> DuplicateGroup:
    """The group of ``members`` (positions) with its keeper: the most pixels, then the lowest position."""
    pick = min(
        range(len(members)),
        key=lambda i: (-int(table["width"][members[i]]) * int(table["height"][members[i]]), members[i]),
    )
    similarity = vectors @ vectors[pick]
    items = [
        DuplicateItem(
            id=table["id"][pos],
            uri=table["uri"][pos],
            width=int(table["width"][pos]),
            height=int(table["height"][pos]),
            position=int(pos),
            similarity=round(float(similarity[i]), 6),
        )
        for i, pos in enumerate(members)
    ]
    others = sorted(
        (item for i, item in enumerate(items) if i != pick), key=lambda item: (-item.similarity, item.position)
    )
    return DuplicateGroup(keeper=items[pick], duplicates=others)
