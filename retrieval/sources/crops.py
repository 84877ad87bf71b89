"""Fixed crops of a photo for multi-crop pooling: the whole photo, its four quadrants and a centre crop.

An ImageNet classifier sees one centred 224-pixel view of a photo; a COCO photo often
shows several things. Relative rows of several views, mean-pooled, describe all of them
(see :func:`retrieval.asif.pooling.pool_views`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

CROP_SETS = ("none", "five")  # none: the whole photo only; five: whole + 4 quadrants + centre
CROPS_PER_IMAGE = {"none": 1, "five": 6}


def crop_boxes(width: int, height: int, crops: str = "five") -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) boxes of the views of a ``width`` x ``height`` photo, the whole photo first.

    ``five``: the four quadrants and the centre crop of half the width and half the height.
    """
    if crops not in CROP_SETS:
        raise ValueError(f"unknown crop set {crops!r}; choose from {', '.join(CROP_SETS)}")
    whole = (0, 0, width, height)
    if crops == "none":
        return [whole]
    half_w, half_h = max(width // 2, 1), max(height // 2, 1)
    quadrants = [(x, y, min(x + half_w, width), min(y + half_h, height)) for y in (0, half_h) for x in (0, half_w)]
    left, top = (width - half_w) // 2, (height - half_h) // 2
    return [whole, *quadrants, (left, top, left + half_w, top + half_h)]


def photo_crops(image: Image.Image, crops: str = "five") -> list[Image.Image]:
    """The views of ``image`` named by ``crops`` (see :func:`crop_boxes`), the whole photo first."""
    return [image if box == (0, 0, *image.size) else image.crop(box) for box in crop_boxes(*image.size, crops)]
