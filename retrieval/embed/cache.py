"""A disk cache of embeddings keyed by (encoder fingerprint, content hash).

Rerunning an evaluation with other ASIF parameters, routes or anchor sets then
encodes nothing again. Images are keyed by the sha256 of their bytes (a file's, or an opener item's),
texts by the sha256 of their UTF-8 text. Each flush appends one ``.npz`` part
(keys, vectors, and for images width/height); parts are written atomically and
never unpickled.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.core.atomic import atomic_path
from retrieval.core.digests import new_build_id, sha256_file
from retrieval.core.errors import ImageDecodeError
from retrieval.embed.pipeline import (
    EmbeddedImages,
    EmbedOptions,
    ImageRow,
    embed_images,
)
from retrieval.sources.items import ImageRef, ItemError

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("index_data") / "cache" / "embeddings"


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Vectors of one encoder, by content hash, stored under ``root/<spec-safe>-<fingerprint>/``."""

    def __init__(self, root: str | Path, encoder: Any) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in encoder.spec)[:60]
        self.folder = Path(root) / f"{safe}-{encoder.fingerprint()}-{encoder.numerics}"
        self.dim = int(encoder.dim)
        self._vectors: dict[str, np.ndarray] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        self._pending: dict[str, np.ndarray] = {}
        self._failures: dict[str, str] = {}  # content hash -> why it could not be embedded
        self._pending_failures: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        for part in sorted(self.folder.glob("part-*.npz")):
            try:
                with np.load(part, allow_pickle=False) as data:
                    keys, vectors = data["keys"], data["vectors"]
                    sizes = data["sizes"] if "sizes" in data.files else None
                    if "failed_keys" in data.files:
                        self._failures.update(
                            zip(data["failed_keys"].tolist(), data["failed_reasons"].tolist(), strict=True)
                        )
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring damaged cache part %s: %s", part, e)
                continue
            for row, key in enumerate(keys.tolist()):
                self._vectors[key] = vectors[row]
                if sizes is not None and sizes[row, 0] > 0:
                    self._sizes[key] = (int(sizes[row, 0]), int(sizes[row, 1]))

    def __len__(self) -> int:
        return len(self._vectors)

    def get(self, key: str) -> np.ndarray | None:
        return self._vectors.get(key)

    def put(self, key: str, vector: np.ndarray, size: tuple[int, int] | None = None) -> None:
        self._vectors[key] = self._pending[key] = np.asarray(vector, np.float32)
        if size is not None:
            self._sizes[key] = size

    def put_failure(self, key: str, reason: str) -> None:
        """Remember that these exact bytes cannot be embedded (decoding is deterministic)."""
        self._failures[key] = self._pending_failures[key] = reason

    def flush(self) -> None:
        """Append the vectors (and failures) added since the last flush as one part file."""
        if not self._pending and not self._pending_failures:
            return
        keys = list(self._pending)
        sizes = np.array([self._sizes.get(key, (0, 0)) for key in keys], np.int32).reshape(-1, 2)
        vectors = np.stack([self._pending[k] for k in keys]) if keys else np.zeros((0, self.dim), np.float32)
        with atomic_path(self.folder / f"part-{new_build_id()}.npz") as tmp, open(tmp, "wb") as handle:
            np.savez(
                handle,
                keys=np.array(keys, dtype=str),
                vectors=vectors,
                sizes=sizes,
                failed_keys=np.array(list(self._pending_failures), dtype=str),
                failed_reasons=np.array(list(self._pending_failures.values()), dtype=str),
            )
        self._pending.clear()
        self._pending_failures.clear()

    def encode_texts(self, texts: Sequence[str], encoder: Any, progress: bool = False) -> np.ndarray:
        """Vectors for ``texts``, encoding only those not cached yet."""
        keys = [text_key(text) for text in texts]
        missing = sorted({key: text for key, text in zip(keys, texts, strict=True) if key not in self._vectors}.items())
        if missing:
            vectors = encoder.encode_texts([text for _, text in missing], progress=progress)
            for (key, _), vector in zip(missing, vectors, strict=True):
                self.put(key, vector)
            self.flush()
        return np.stack([self._vectors[key] for key in keys]) if keys else np.zeros((0, self.dim), np.float32)

    def embed_images(
        self, refs: Sequence[ImageRef], encoder: Any, options: EmbedOptions = EmbedOptions()
    ) -> EmbeddedImages:
        """Like :func:`retrieval.embed.pipeline.embed_images`, decoding and encoding only images not cached yet."""
        hashes: list[str | None] = []
        errors: list[ItemError] = []
        for ref in refs:
            try:
                hashes.append(
                    sha256_file(ref.path) if ref.path is not None else hashlib.sha256(ref.read_bytes()).hexdigest()
                )
            except OSError as e:
                hashes.append(None)
                errors.append(ItemError(path=ref.location, reason=f"unreadable: {e.strerror or e}", kind="image"))
            except ImageDecodeError as e:  # an opener that failed
                hashes.append(None)
                errors.append(ItemError(path=ref.location, reason=e.reason, kind="image"))
        todo = [
            (ref, key)
            for ref, key in zip(refs, hashes, strict=True)
            if key is not None and key not in self._vectors and key not in self._failures
        ]
        fresh = (
            embed_images([ref for ref, _ in todo], encoder, options)
            if todo
            else EmbeddedImages(rows=[], vectors=np.zeros((0, self.dim), np.float32))
        )
        for row, vector in zip(fresh.rows, fresh.vectors, strict=True):
            self.put(row.sha256, vector, (row.width, row.height))
        key_of = {ref.location: key for ref, key in todo}
        for error in fresh.errors:
            self.put_failure(key_of[error.path], error.reason)
        self.flush()
        rows, vectors = [], []
        for ref, key in zip(refs, hashes, strict=True):
            if key is not None and key in self._failures:
                errors.append(ItemError(path=ref.location, reason=self._failures[key], kind="image"))
            if key is None or key not in self._vectors:
                continue
            width, height = self._sizes.get(key, (0, 0))
            rows.append(ImageRow(ref, width, height, key))
            vectors.append(self._vectors[key])
        matrix = np.stack(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        return EmbeddedImages(rows=rows, vectors=matrix, errors=errors)
