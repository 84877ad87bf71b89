"""JPEG thumbnails of indexed images, made on demand and kept in a bounded cache.

Only images of the index are read, found by row position in the build's items table: no path in a
request ever reaches the file system.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict

from retrieval.core.errors import ImageDecodeError
from retrieval.serve.errors import ApiError
from retrieval.serve.served import Snapshot
from retrieval.sources.images import decode_image
from retrieval.sources.inputs import read_item_bytes

MIN_SIZE, MAX_SIZE, DEFAULT_SIZE = 16, 1024, 256


class ThumbnailCache:
    """JPEG bytes by (index, build, position, size), least recently used dropped beyond ``max_bytes``. Thread-safe."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, snapshot: Snapshot, position: int, size: int = DEFAULT_SIZE) -> bytes:
        """The thumbnail of live image ``position`` (404 for no such image or one that cannot be read)."""
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise ApiError(422, f"size must be between {MIN_SIZE} and {MAX_SIZE}, got {size}")
        if not snapshot.is_live("image", position):
            raise ApiError(404, f"no image {position} in index {snapshot.name}")
        key = (snapshot.name, snapshot.build, position, size)
        with self._lock:
            data = self._entries.get(key)
            if data is not None:
                self._entries.move_to_end(key)
                return data
        data = make_thumbnail(snapshot.index.items("image")["uri"][position], size)
        if data is None:
            raise ApiError(404, f"image {position} of index {snapshot.name} cannot be read now")
        self._put(key, data)
        return data

    def _put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes and self._entries:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= len(dropped)


def make_thumbnail(uri: str, size: int) -> bytes | None:
    """JPEG bytes of the indexed image ``uri`` (a file, or a tar shard's or parquet file's member)
    scaled to fit ``size`` x ``size``; None when it cannot be read."""
    if not uri or not os.path.isabs(uri):  # a url or a relative name from elsewhere: nothing to read here
        return None
    try:
        picture = decode_image(read_item_bytes(uri), uri, draft_size=(size, size)).image
    except (ImageDecodeError, OSError, ValueError):
        return None
    picture = picture.copy()
    picture.thumbnail((size, size))
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=85)
    return out.getvalue()
