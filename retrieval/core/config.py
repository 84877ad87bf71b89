"""Small option dataclasses shared by the Python API and the CLI.

Errors name what the caller set in backticks, in the library's words (`IndexOptions.target_recall`, a
function's `images`); the command line says its flags instead (``retrieval.cli.common.FLAGS``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from retrieval.core.errors import InputError

DEFAULT_LABEL_TEMPLATE = "a photo of a {label}"


@dataclass(frozen=True)
class CaptionOptions:
    """How caption and pairs files are read."""

    caption_column: str = "caption"
    image_column: str = "image"
    template: str | None = None
    encoding: str = "utf-8"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EncoderChoice:
    """Which encoders embed a collection: one contrastive model, or an image and a text model."""

    clip: str | None = None
    image: str | None = None
    text: str | None = None
    checkpoint: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.clip and (self.image or self.text):
            raise InputError(
                "give either `EncoderChoice.clip` (a contrastive model) or `EncoderChoice.image` with "
                "`EncoderChoice.text`, not both"
            )
        if not self.clip and not (self.image and self.text):
            raise InputError(
                "give `EncoderChoice.clip` (a contrastive model, e.g. open_clip:ViT-B-32/openai), or both "
                "`EncoderChoice.image` and `EncoderChoice.text`"
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InputError(f"`EncoderChoice.device` must be auto, cpu or cuda, got {self.device!r}")

    @property
    def is_contrastive(self) -> bool:
        return self.clip is not None


@dataclass(frozen=True)
class IndexOptions:
    """Which vector indexes a build makes: a type (``auto``, ``flat``, ``hnsw``, ``ivf``, ``ivfsq``, ``ivfpq``
    or a FAISS factory string), a memory budget in bytes for all of them together, and the recall@10 that
    ``auto`` and the knob tuning aim for. ``shards`` > 1: each vector index is written as that many
    index shards over contiguous row ranges (searched in turn, or by one Ray actor each)."""

    index_type: str = "auto"
    max_memory: int | None = None
    target_recall: float = 0.95
    shards: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.target_recall <= 1:
            raise InputError(f"`IndexOptions.target_recall` must be in (0, 1], got {self.target_recall}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise InputError(f"`IndexOptions.max_memory` must be positive, got {self.max_memory}")
        if not isinstance(self.shards, int) or self.shards < 1:
            raise InputError(f"`IndexOptions.shards` must be a whole number >= 1, got {self.shards!r}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.shards == 1:
            del data["shards"]  # unsharded manifests stay as they were
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> IndexOptions:
        data = data or {}
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})
