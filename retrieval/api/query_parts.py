"""The parts of an opened index that turn queries into rows to search, each loaded once on first use: the
item tables, the encoders (checked against the manifest), the ASIF anchors and relative rows.

A base class of :class:`~retrieval.api.engine.Index`, which sets the attributes used here (see
:class:`~retrieval.api.vector_parts.VectorParts`, and ``encoder_snapshots`` and ``_serial``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.api.index_parts import (
    encoder_choice_for,
    load_anchor_spaces,
    load_checked_encoders,
)
from retrieval.api.lazy import Serialised
from retrieval.api.vector_parts import VectorParts
from retrieval.asif.anchors import AnchorSpaces
from retrieval.asif.pooling import relative_of_views
from retrieval.asif.relative import AsifParams, SparseRelativeIndex
from retrieval.embed.views import encode_views
from retrieval.encoders.base import ImageEncoder, TextEncoder
from retrieval.sources.items import load_image, normalize_image

ImageQuery = Any  # a path (str or Path) or a PIL image


class QueryParts(VectorParts):
    """Items, encoders, anchors and relative rows, loaded lazily (see the module docstring)."""

    encoder_snapshots: str | Path | None
    _serial: Serialised

    def items(self, kind: str) -> dict[str, list[Any]]:
        """The stored item columns of ``kind`` (``image`` or ``caption``), row-aligned with positions."""
        return self._parts.get(("items", kind), lambda: self._read_items(kind))

    def _read_items(self, kind: str) -> dict[str, list[Any]]:
        table: dict[str, list[Any]] = self.store.read_table(self._files["items"][kind]).to_pydict()
        return table

    # -- encoding queries (one call at a time per encoder) ----------------------------------

    def encode(self, modality: str, values: Sequence[Any]) -> np.ndarray:
        """``values`` (texts, or image paths / PIL images) encoded by the index's ``modality`` encoder, one row each."""
        if modality == "text":
            text_encoder = self.text_encoder
            with self._serial.using(text_encoder):
                return text_encoder.encode_texts(list(values))
        pictures = _pictures(values)  # decoded in parallel with other threads
        image_encoder = self.image_encoder
        with self._serial.using(image_encoder):
            return image_encoder.encode_images(pictures)

    def in_route_space(self, modality: str, values: Sequence[Any], route: str) -> Any:
        """Query ``values`` of ``modality`` as rows in ``route``'s space: encoder vectors, or for ``asif``
        relative rows (image queries pooled over the index's :attr:`image_views`, as its images were)."""
        if route != "asif":
            return self.encode(modality, values)
        if modality == "image" and self.image_views != "none":
            encoder = self.image_encoder
            with self._serial.using(encoder):
                views = encode_views(_pictures(values), encoder, self.image_views)
            return relative_of_views(self.anchor_spaces, views, self.asif_params)
        return self.anchor_spaces.relative(self.encode(modality, values), modality, self.asif_params)

    @property
    def image_views(self) -> str:
        """The views each image's ASIF relative row pools (``none``: the whole photo; indexes from before it)."""
        return str(self.manifest.get("image_views", "none"))

    # -- lazily loaded parts (each once, whichever thread asks first) ------------------------

    def relative_index(self, kind: str) -> SparseRelativeIndex:
        """The ASIF relative rows of the ``kind`` items, loaded on first use."""
        return self._parts.get(
            ("relative", kind), lambda: self.store.read_sparse(self._files["relative"][kind], SparseRelativeIndex.load)
        )

    @property
    def anchor_spaces(self) -> AnchorSpaces:
        """The anchor sets of an ASIF index (with their weights), loaded on first use."""
        return self._parts.get("anchors", self._load_anchor_spaces)

    def _load_anchor_spaces(self) -> AnchorSpaces:
        return load_anchor_spaces(self.store, self.manifest, self.path)

    @property
    def asif_params(self) -> AsifParams:
        """The ASIF k and p the collection's relative rows were computed with."""
        return AsifParams.from_json(self.manifest["asif"])

    def _encoders(self) -> tuple[ImageEncoder, TextEncoder]:
        return self._parts.get("encoders", self._load_encoders)

    def encoder_choice(self) -> Any:
        """The :class:`~retrieval.core.config.EncoderChoice` that loads the encoders this index was built with."""
        return encoder_choice_for(self.manifest, self.device)

    def _load_encoders(self) -> tuple[Any, Any]:
        return load_checked_encoders(self.manifest, self.device, self.encoder_snapshots, self.path)

    @property
    def image_encoder(self) -> ImageEncoder:
        """The image encoder the index was built with (loaded and checked on first use)."""
        return self._encoders()[0]

    @property
    def text_encoder(self) -> TextEncoder:
        """The text encoder the index was built with (the same object as the image encoder for CLIP)."""
        return self._encoders()[1]


def _pictures(images: Sequence[ImageQuery]) -> list[Any]:
    """Query images (paths or PIL images) as upright RGB PIL images; an unreadable one raises ImageDecodeError."""
    return [normalize_image(image) if hasattr(image, "convert") else load_image(image).image for image in images]
