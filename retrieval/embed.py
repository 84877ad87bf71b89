"""The embedding stage: decode and preprocess images in DataLoader workers, encode in batches.

Unreadable images are skipped and reported as :class:`ItemError` rows; they
never stop a build.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .collection import ImageRef, ItemError, load_image
from .errors import ImageDecodeError, InputError

log = logging.getLogger(__name__)

SMALL_COLLECTION = 64  # below this many images, worker processes cost more than they save


@dataclass(frozen=True)
class EmbedOptions:
    """How the embedding stage runs."""

    batch_size: int = 32
    workers: int | str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers != "auto" and (not isinstance(self.workers, int) or self.workers < 0):
            raise InputError(f"--workers must be 'auto' or a whole number >= 0, got {self.workers!r}")


@dataclass
class ImageRow:
    """An image that was decoded and embedded, with what was learnt while decoding it."""

    ref: ImageRef
    width: int
    height: int
    sha256: str


@dataclass
class EmbeddedImages:
    """The result of embedding a list of images: rows and vectors aligned, plus the failures."""

    rows: list[ImageRow]
    vectors: np.ndarray
    errors: list[ItemError] = field(default_factory=list)


def resolve_workers(workers: int | str, n_items: int) -> int:
    """Number of DataLoader worker processes: 'auto' uses the spare cores on large collections."""
    if workers != "auto":
        return int(workers)
    if n_items < SMALL_COLLECTION:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class _ImageDataset:
    """Map-style dataset: index -> (index, pixels or None, width, height, sha256, error reason)."""

    def __init__(self, refs: Sequence[ImageRef], transform: Callable[[Any], Any]) -> None:
        self.paths = [ref.path for ref in refs]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, Any, int, int, str, str | None]:
        path = self.paths[position]
        try:
            loaded = load_image(path)
        except ImageDecodeError as e:
            return position, None, 0, 0, "", e.reason
        try:
            pixels = self.transform(loaded.image)
        except Exception as e:  # a transform failure must cost one image, not the build
            return position, None, 0, 0, "", f"preprocessing failed: {type(e).__name__}: {e}"
        return position, pixels, loaded.width, loaded.height, loaded.sha256, None


def _collate(samples: list[tuple[int, Any, int, int, str, str | None]]) -> dict[str, Any]:
    import torch

    good = [s for s in samples if s[1] is not None]
    return {
        "pixels": torch.stack([s[1] for s in good]) if good else None,
        "ok": [(s[0], s[2], s[3], s[4]) for s in good],
        "failed": [(s[0], s[5]) for s in samples if s[1] is None],
    }


def embed_images(refs: Sequence[ImageRef], encoder: Any, options: EmbedOptions = EmbedOptions()) -> EmbeddedImages:
    """Embed ``refs`` with ``encoder`` (an ``ImageEncoder``), skipping and reporting unreadable files."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    dataset = _ImageDataset(refs, encoder.image_transform())
    workers = resolve_workers(options.workers, len(refs))
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=encoder.device == "cuda",
        prefetch_factor=4 if workers else None,
    )
    rows: list[ImageRow] = []
    chunks: list[np.ndarray] = []
    errors: list[ItemError] = []
    with tqdm(total=len(refs), desc="images", unit="img", file=sys.stderr, delay=1.0, disable=not options.progress) as bar:
        for batch in loader:
            if batch["pixels"] is not None:
                chunks.append(encoder.encode_image_tensors(batch["pixels"]))
                rows.extend(ImageRow(refs[i], w, h, sha) for i, w, h, sha in batch["ok"])
            for position, reason in batch["failed"]:
                log.warning("skipped %s: %s", refs[position].path, reason)
                errors.append(ItemError(path=str(refs[position].path), reason=reason, kind="image"))
            bar.update(len(batch["ok"]) + len(batch["failed"]))
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    return EmbeddedImages(rows=rows, vectors=vectors.astype(np.float32, copy=False), errors=errors)
