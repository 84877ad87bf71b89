"""Embed several views (crops) of each image for multi-view ASIF pooling (see retrieval.asif.pooling)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.core.errors import InputError
from retrieval.sources.crops import CROP_SETS, CROPS_PER_IMAGE, photo_crops

if TYPE_CHECKING:
    from PIL import Image

    from retrieval.sources.items import ImageRef

VIEW_SETS = CROP_SETS


def check_views(views: str) -> str:
    """``views`` if it names a crop set, else an InputError listing them."""
    if views not in VIEW_SETS:
        raise InputError(f"unknown image views {views!r}; choose from {', '.join(VIEW_SETS)}")
    return views


def encode_views(pictures: Sequence[Image.Image], encoder: Any, views: str, batch_size: int = 64) -> np.ndarray:
    """(n, views, dim) vectors of the crops of decoded ``pictures``, the whole photo first."""
    per_image = CROPS_PER_IMAGE[check_views(views)]
    if not pictures:
        return np.zeros((0, per_image, encoder.dim), np.float32)
    crops = [crop for picture in pictures for crop in photo_crops(picture, views)]
    vectors = encoder.encode_images(crops, batch_size=batch_size)
    return vectors.reshape(len(pictures), per_image, -1)


def embed_views(refs: Sequence[ImageRef], encoder: Any, views: str, batch_size: int = 16) -> np.ndarray:
    """(n, views, dim) view vectors of the images ``refs`` (loaded again; they were readable once already)."""
    parts = [
        encode_views([ref.load().image for ref in refs[i : i + batch_size]], encoder, views)
        for i in range(0, len(refs), batch_size)
    ]
    return np.concatenate(parts) if parts else encode_views([], encoder, views)
