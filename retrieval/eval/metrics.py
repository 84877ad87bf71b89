"""Retrieval quality of an index over paired data (captions that name their image)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval.api.engine import Index
from retrieval.core.errors import InputError
from retrieval.index.recall import recall_from_ranks


def recall_at_k(hit_ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose first relevant hit has 0-based rank < k (rank -1: not found)."""
    return {k: float(recall_from_ranks(hit_ranks, k).mean()) if len(hit_ranks) else 0.0 for k in ks}


def first_relevant_rank(
    positions: np.ndarray, relevant: Sequence[set[int]], scores: np.ndarray | None = None
) -> np.ndarray:
    """0-based rank of the best-placed relevant position in each row of ``positions`` (-1 when none).

    With the rows' ``scores``, ties count against the query (as in
    :func:`retrieval.eval.evaluate.rank_of_relevant`): the rank is the number of
    returned irrelevant items that score at least as high as the best relevant one.
    """
    ranks = np.full(len(positions), -1, dtype=np.int64)
    for row, (candidates, wanted) in enumerate(zip(positions, relevant, strict=True)):
        hits = [rank for rank, position in enumerate(candidates) if int(position) in wanted]
        if not hits:
            continue
        if scores is None:
            ranks[row] = hits[0]
            continue
        best = max(scores[row][rank] for rank in hits)
        ranks[row] = sum(
            1
            for rank, position in enumerate(candidates)
            if position >= 0 and int(position) not in wanted and scores[row][rank] >= best
        )
    return ranks


def live_pairs(index: Index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(live image positions, live caption positions that name a live image, each such caption's image row).

    Deleted items (``retrieval remove``) are neither queries nor candidates; a
    caption's image row indexes the live image positions.
    """
    images, captions = index.items("image"), index.items("caption")
    dead_images, dead_captions = set(index.deleted("image").tolist()), set(index.deleted("caption").tolist())
    live_images = np.array([pos for pos in range(len(images["id"])) if pos not in dead_images], np.int64)
    row_of = {images["id"][pos]: row for row, pos in enumerate(live_images)}
    kept = [
        (pos, row_of[image_id])
        for pos, image_id in enumerate(captions["image_id"])
        if pos not in dead_captions and image_id in row_of
    ]
    if not kept:
        raise InputError(f"{index.path}: no caption names an indexed image; recall needs captions from a pairs file")
    caption_positions, owner = (np.array(column, np.int64) for column in zip(*kept, strict=True))
    return live_images, caption_positions, owner


def paired_recall(index: Index, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Text -> image and image -> caption recall@k, using the index's own live captions and images as queries.

    A caption's relevant image is the one its pairs file names; an image query
    counts as found when any of its captions is in the top k. Ties count against
    the query; deleted items are left out.
    """
    live_images, caption_positions, owner = live_pairs(index)
    captions_of: dict[int, set[int]] = {}
    for caption_pos, image_row in zip(caption_positions, owner, strict=True):
        captions_of.setdefault(int(live_images[image_row]), set()).add(int(caption_pos))
    depth = max(ks)

    scores, image_hits = index.search_collection("caption", depth)
    t2i = first_relevant_rank(
        image_hits[caption_positions], [{int(live_images[row])} for row in owner], scores[caption_positions]
    )

    scores, caption_hits = index.search_collection("image", depth)
    image_queries = sorted(captions_of)
    i2c = first_relevant_rank(
        caption_hits[image_queries], [captions_of[pos] for pos in image_queries], scores[image_queries]
    )
    return {
        "text_to_image": recall_at_k(t2i, ks),
        "image_to_caption": recall_at_k(i2c, ks),
        "queries": {"text": len(caption_positions), "image": len(image_queries)},
    }
