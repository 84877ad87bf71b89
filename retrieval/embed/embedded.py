"""The embed stage's output, the write stage's input: items and their vectors, row for row
(:class:`EmbeddedImages` from the image pipeline, :class:`EmbeddedItems` from the whole stage).

A plain dataclass: precomputed embeddings, or the shards of a distributed builder, can be
turned into one without running an encoder, and written as an index by
:func:`retrieval.api.write.write_index`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.core.errors import InputError
from retrieval.sources.items import CaptionRecord, ImageRef, ItemError

VECTOR_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


@dataclass
class ImageRow:
    """An image that was decoded and embedded, with what was learnt while decoding it (0, 0 and ""
    mean unknown: a vector that came from elsewhere, e.g. precomputed, for an image never decoded here)."""

    ref: ImageRef
    width: int = 0
    height: int = 0
    sha256: str = ""


@dataclass
class EmbeddedImages:
    """The result of embedding a list of images: rows and vectors aligned, plus the failures."""

    rows: list[ImageRow]
    vectors: np.ndarray
    errors: list[ItemError] = field(default_factory=list)
    resumed: int = 0  # images (embedded or skipped) taken from the progress shards of an earlier run
    workers: int = 0  # DataLoader worker processes this run started
    replicas: bool = False  # whether those workers encoded too (single-threaded encoder copies)
    decode_device: str | None = None  # device of the batched JPEG decode (None: PIL in the workers)
    decoded_on_device: int = 0  # images that batched decode took (the rest went the CPU path)
    startup_seconds: float = 0.0  # from the start to the first batch encoded: worker spawn, first CUDA call, warm-up
    steady_images_per_second: float = 0.0  # images after the first batch over the time after it (0: one batch or none)


@dataclass
class EmbedStats:
    """How the image vectors were made, for the manifest's ``build`` record (all optional)."""

    images_per_second: float | None = None
    resumed: int = 0  # images taken from the progress shards of an earlier run
    device: str | None = None
    workers: int = 0  # DataLoader worker processes
    replicas: bool = False  # whether those workers encoded too
    decode: str | None = (
        None  # where JPEGs were decoded: "cpu" (PIL in the workers), the batched decode's device, None: not here
    )
    startup_seconds: float | None = None  # to the first batch encoded (worker spawn, first CUDA call, warm-up)
    steady_images_per_second: float | None = None  # after the first batch


@dataclass
class EmbeddedItems:
    """Images and captions with their vectors (float32 or float16, one row per item, unit length).

    ``encoders`` maps "image" and "text" to the record of the encoder that made each kind
    (``{"spec", "dim", "fingerprint"}``, as :func:`retrieval.store.provenance.encoder_record`
    gives); ``shared_space`` is True when both kinds are in one space (a contrastive model).
    ``errors`` lists the items that were skipped.
    """

    images: list[ImageRow]
    image_vectors: np.ndarray
    captions: list[CaptionRecord]
    caption_vectors: np.ndarray
    encoders: dict[str, dict[str, Any]]
    shared_space: bool = False
    errors: list[ItemError] = field(default_factory=list)
    stats: EmbedStats = field(default_factory=EmbedStats)
    view_vectors: np.ndarray | None = None  # (images, views, dim): crops of each image, for multi-view ASIF pooling

    @property
    def image_ids(self) -> list[str]:
        return [row.ref.id for row in self.images]

    @property
    def caption_ids(self) -> list[str]:
        return [record.id for record in self.captions]

    def check(self) -> None:
        """Raise InputError unless the vectors fit the items and the encoder records."""
        for role, kind, items, vectors in (
            ("image", "image", self.images, self.image_vectors),
            ("text", "caption", self.captions, self.caption_vectors),
        ):
            record = self.encoders.get(role)
            if not isinstance(record, dict) or not {"spec", "dim", "fingerprint"} <= set(record):
                raise InputError(f"{role} encoder record must have spec, dim and fingerprint, got {record!r}")
            vectors = np.asarray(vectors)
            if vectors.dtype not in VECTOR_DTYPES:
                raise InputError(f"{kind} vectors must be float32 or float16, got {vectors.dtype}")
            if vectors.ndim != 2 or vectors.shape != (len(items), int(record["dim"])):
                raise InputError(
                    f"{kind} vectors have shape {vectors.shape}; expected ({len(items)}, {record['dim']}): "
                    f"one row per {kind}, of the {role} encoder's dimension"
                )
            if not np.isfinite(vectors).all():
                raise InputError(f"{kind} vectors hold NaN or infinite values")
        if not self.images and not self.captions:
            raise InputError(
                "no image could be read and no caption was given; nothing to index (see the warnings above)"
            )
