"""Retrieval quality of an index over paired data (captions that name their image)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from retrieval.api.engine import Index
from retrieval.core.errors import InputError


def recall_at_k(hit_ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose first relevant hit has 0-based rank < k (rank -1: not found)."""
    found = hit_ranks >= 0
    return {k: float(np.mean(found & (hit_ranks < k))) if len(hit_ranks) else 0.0 for k in ks}


def first_relevant_rank(positions: np.ndarray, relevant: Sequence[set[int]]) -> np.ndarray:
    """0-based rank of the first relevant position in each row of ``positions`` (-1 when none)."""
    ranks = np.full(len(positions), -1, dtype=np.int64)
    for row, (candidates, wanted) in enumerate(zip(positions, relevant)):
        for rank, position in enumerate(candidates):
            if int(position) in wanted:
                ranks[row] = rank
                break
    return ranks


def paired_recall(index: Index, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Text -> image and image -> caption recall@k, using the index's own captions and images as queries.

    A caption's relevant image is the one its pairs file names; an image query
    counts as found when any of its captions is in the top k.
    """
    images, captions = index.items("image"), index.items("caption")
    image_position = {image_id: pos for pos, image_id in enumerate(images["id"])}
    caption_targets = [image_position.get(image_id) for image_id in captions["image_id"]]
    if not any(target is not None for target in caption_targets):
        raise InputError(f"{index.path}: no caption names an indexed image; recall needs a pairs file")
    captions_of: dict[int, set[int]] = {}
    for caption_pos, image_pos in enumerate(caption_targets):
        if image_pos is not None:
            captions_of.setdefault(image_pos, set()).add(caption_pos)
    depth = max(ks)

    _, image_hits = index.search_collection("caption", depth)
    queried = [pos for pos, target in enumerate(caption_targets) if target is not None]
    t2i = first_relevant_rank(image_hits[queried], [{caption_targets[pos]} for pos in queried])

    _, caption_hits = index.search_collection("image", depth)
    image_queries = sorted(captions_of)
    i2c = first_relevant_rank(caption_hits[image_queries], [captions_of[pos] for pos in image_queries])
    return {
        "text_to_image": recall_at_k(t2i, ks),
        "image_to_caption": recall_at_k(i2c, ks),
        "queries": {"text": len(queried), "image": len(image_queries)},
    }
