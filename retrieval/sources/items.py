"""Items: the images and captions a source yields, their stable ids, and the record of a skipped item."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from retrieval.core.errors import ImageDecodeError
from retrieval.sources.images import (  # noqa: F401  (re-exported)
    LoadedImage,
    decode_image,
    load_image,
    normalize_image,
)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")


def stable_id(prefix: str, *parts: object) -> str:
    """Return ``prefix-<16 hex>`` where the hex is sha1 over the parts joined by NUL."""
    joined = "\0".join(str(part) for part in parts)
    return f"{prefix}-{hashlib.sha1(joined.encode('utf-8')).hexdigest()[:16]}"


Opener = Callable[[], "bytes | BinaryIO"]
"""Returns an item's bytes, or a binary file object (read to the end, then closed)."""


@dataclass(frozen=True)
class ImageRef:
    """An image to embed: a file found through a user argument, or bytes from elsewhere.

    A file item has a ``path``. An item whose bytes live elsewhere (a tar member, a parquet
    cell, memory) has a ``uri`` naming it and an ``opener`` returning its bytes; ``version``
    (a content size, an etag) is what a resumed build compares to tell whether the bytes
    changed (None: the uri alone names the content). Either way ``location`` is what the
    index stores as the item's uri and the id derives from it, so file items keep their ids.
    """

    path: Path | None = None
    source: str = ""
    label: str | None = None
    uri: str | None = None
    opener: Opener | None = field(default=None, compare=False, repr=False)
    version: str | int | None = None
    metadata: Mapping[str, Any] | None = field(
        default=None, compare=False, repr=False
    )  # source fields (e.g. img2dataset's json)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.opener is None):
            raise ValueError("an ImageRef needs a path, or an opener (with a uri), not both")
        if self.opener is not None and not self.uri:
            raise ValueError("an ImageRef with an opener needs a uri naming it")

    @property
    def location(self) -> str:
        """The file path, or the uri of an opener item."""
        return str(self.path) if self.path is not None else str(self.uri)

    @property
    def id(self) -> str:
        """Stable id derived from the resolved path (or the uri)."""
        return stable_id("img", self.location)

    def read_bytes(self) -> bytes:
        """The item's bytes; a failure of the opener becomes an ImageDecodeError naming the item."""
        if self.opener is None:
            return Path(self.path).read_bytes()  # type: ignore[arg-type]
        try:
            got = self.opener()
            if isinstance(got, (bytes, bytearray, memoryview)):
                return bytes(got)
            with got:
                return got.read()
        except Exception as e:  # any opener (tar, parquet, network) may fail in its own way
            raise ImageDecodeError(self.location, f"cannot read: {type(e).__name__}: {e}") from None

    def load(self, draft_size: tuple[int, int] | None = None) -> LoadedImage:
        """Read, hash, decode and normalise the image (see :func:`retrieval.sources.images.load_image`)."""
        if self.opener is None:
            return load_image(self.path, draft_size=draft_size)  # type: ignore[arg-type]
        return decode_image(self.read_bytes(), self.location, draft_size=draft_size)

    def resume_state(self) -> list[object]:
        """What a resumed build compares: path, size and mtime of a file (None when it is gone),
        the uri and version of an opener item (nothing is opened)."""
        if self.opener is not None:
            return [self.location, self.version]
        try:
            st = os.stat(self.path)  # type: ignore[arg-type]
        except OSError:
            return [self.location, None]
        return [self.location, [st.st_size, st.st_mtime_ns]]


@dataclass(frozen=True)
class CaptionRecord:
    """One caption (optionally paired with an image) read from a source."""

    text: str
    source: str
    row: int
    image: Path | str | None = None  # the paired image: a file path, or the uri of an item that is not a file
    label: str | None = None
    metadata: Mapping[str, Any] | None = field(
        default=None, compare=False, repr=False
    )  # source fields (e.g. img2dataset's json)

    @property
    def id(self) -> str:
        """Stable id derived from source, row and text."""
        return stable_id("cap", self.source, self.row, self.text)

    @property
    def image_id(self) -> str | None:
        """Id of the paired image (equal to ``ImageRef.id`` for that path or uri)."""
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
