"""Items: the images and captions a source yields, their stable ids, and the record of a skipped item."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from retrieval.sources.images import LoadedImage, load_image, normalize_image  # noqa: F401  (re-exported)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)


CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")


def stable_id(prefix: str, *parts: object) -> str:
    """Return ``prefix-<16 hex>`` where the hex is sha1 over the parts joined by NUL."""
    joined = "\0".join(str(part) for part in parts)
    return f"{prefix}-{hashlib.sha1(joined.encode('utf-8')).hexdigest()[:16]}"


@dataclass(frozen=True)
class ImageRef:
    """An image file found through a user argument."""

    path: Path
    source: str
    label: str | None = None

    @property
    def id(self) -> str:
        """Stable id derived from the resolved path."""
        return stable_id("img", str(self.path))


@dataclass(frozen=True)
class CaptionRecord:
    """One caption (optionally paired with an image) read from a source."""

    text: str
    source: str
    row: int
    image: Path | None = None
    label: str | None = None

    @property
    def id(self) -> str:
        """Stable id derived from source, row and text."""
        return stable_id("cap", self.source, self.row, self.text)

    @property
    def image_id(self) -> str | None:
        """Id of the paired image (equal to ``ImageRef.id`` for that path)."""
        return None if self.image is None else stable_id("img", str(self.image))


@dataclass(frozen=True)
class ItemError:
    """An item that was skipped, with the reason."""

    path: str
    reason: str
    kind: str = "image"
    row: int | None = None
    line: int | None = None  # physical line of a text file (1-based), where it differs from ``row`` or matters
    byte: int | None = None  # byte offset in the file of the problem (e.g. an undecodable byte)

    def to_json(self) -> dict[str, object]:
        """Return a JSON-serialisable dict (``line``/``byte`` only when known)."""
        out: dict[str, object] = {"path": self.path, "reason": self.reason, "kind": self.kind, "row": self.row}
        out.update({key: value for key, value in (("line", self.line), ("byte", self.byte)) if value is not None})
        return out


@dataclass
class CaptionFile:
    """The records read from one caption file and the rows that were skipped."""

    path: Path
    records: list[CaptionRecord]
    errors: list[ItemError]

    @property
    def is_pairs(self) -> bool:
        """True when the records carry image paths."""
        return any(record.image is not None for record in self.records)
