"""Build an index from vectors made elsewhere: clip-retrieval's inference output (img_emb/, text_emb/, metadata/).

Nothing is encoded for the collection: the vectors go straight to the write stage
(:func:`retrieval.api.write.commit_index`). The encoder is still loaded, because the index
answers text and image queries with it and records its dimension and weights fingerprint;
a hub spec therefore needs its weights at hand (offline: ``--checkpoint``). Loading it
also lets the build check the vectors: up to 32 sampled images that can be read here and
32 sampled captions are encoded again, and a cosine below 0.99 means the vectors came
from another model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.api.write import WriteOptions, commit_index, prepare_target
from retrieval.core.config import EncoderChoice, IndexOptions
from retrieval.core.errors import EncoderMismatchError, ImageDecodeError, InputError
from retrieval.embed.embedded import EmbeddedItems, EmbedStats, ImageRow
from retrieval.encoders.base import ImageEncoder, TextEncoder
from retrieval.encoders.registry import load_encoders
from retrieval.sources.clip_embeddings import (
    EmbeddingFolder,
    gather_embedded_rows,
    open_embedding_folder,
)
from retrieval.sources.items import ImageRef
from retrieval.store.locking import writer_lock
from retrieval.store.provenance import encoder_record

if TYPE_CHECKING:
    from retrieval.api.engine import Index

log = logging.getLogger(__name__)

VERIFY_SAMPLES = 32
MIN_COSINE = 0.99
UNIT_TOLERANCE = 1e-2  # float16 rows of unit vectors are within about 1e-3 of length 1


@dataclass(frozen=True)
class EmbeddingsOptions:
    """How to build from precomputed embeddings: the CLIP encoder that made them, where it runs, the index type."""

    encoder: str
    checkpoint: str | None = None
    device: str = "auto"
    index_options: IndexOptions = IndexOptions()
    verify: bool = True  # re-encode a sample and compare
    progress: bool = True


def build_index_from_embeddings(embeddings: str | Path, index: str | Path, options: EmbeddingsOptions) -> Index:
    """Write the index ``index`` from the clip-retrieval embedding folder ``embeddings``; returns it opened.

    Every file is checked before anything is written (missing shards, row counts, shapes, the encoder's
    dimension), and a previous index at ``index`` stays as it was when the build fails.
    """
    from retrieval.api.engine import open_index

    started = time.perf_counter()
    folder = open_embedding_folder(embeddings)
    index = Path(index)
    prepare_target(index)
    with writer_lock(index):
        encoder = load_encoders(
            EncoderChoice(clip=options.encoder, checkpoint=options.checkpoint, device=options.device)
        )[0]
        embedded = embedded_items(folder, encoder, options.verify)
        commit_index(
            embedded,
            index,
            WriteOptions(
                index_options=options.index_options,
                sources={"embeddings": [str(folder.root)]},
                checkpoint=options.checkpoint,
                progress=options.progress,
                started=started,
            ),
        )
    return open_index(index, device=options.device)


def embedded_items(folder: EmbeddingFolder, encoder: Any, verify: bool = True) -> EmbeddedItems:
    """The folder's items and vectors (unit length), checked against ``encoder``, as the write stage takes them."""
    for kind, dim in folder.dims.items():
        if dim != encoder.dim:
            shard = next(part.shards[kind] for part in folder.parts)
            raise EncoderMismatchError(
                f"{shard}: {kind} vectors of dimension {dim}, but {encoder.spec} makes vectors of "
                f"dimension {encoder.dim}; these embeddings were not made with {encoder.spec}"
            )
    rows = gather_embedded_rows(folder)
    image_vectors, image_where = _unit_rows(folder, "image", rows.image_rows)
    caption_vectors, caption_where = _unit_rows(folder, "text", rows.caption_rows)
    if verify:
        check_images(rows.images, image_vectors, image_where, encoder)
        check_texts([c.text for c in rows.captions], caption_vectors, caption_where, encoder)
    record = encoder_record(encoder)
    return EmbeddedItems(
        images=[_row(ref) for ref in rows.images],
        image_vectors=image_vectors,
        captions=rows.captions,
        caption_vectors=caption_vectors,
        encoders={"image": record, "text": record},
        shared_space=True,
        errors=rows.errors,
        stats=EmbedStats(device=str(encoder.device)),
    )


def _row(ref: ImageRef) -> ImageRow:
    """An image row with what the source's fields say of it (img2dataset's width, height, sha256), else unknown."""
    meta = ref.metadata or {}

    def number(key: str) -> int:
        value = meta.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value else 0

    sha = meta.get("sha256")
    return ImageRow(ref, width=number("width"), height=number("height"), sha256=sha if isinstance(sha, str) else "")


def _unit_rows(folder: EmbeddingFolder, kind: str, rows: Sequence[int]) -> tuple[np.ndarray, list[tuple[Path, int]]]:
    """The vectors of ``rows``, normalised (with a warning when they were not unit length already)."""
    if kind not in folder.dims or not rows:
        return np.zeros((0, next(iter(folder.dims.values()))), np.float32), []
    vectors, where = folder.vectors(kind, np.asarray(rows, np.int64))
    norms = np.linalg.norm(vectors, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        path, local = where[int(bad[0])]
        raise InputError(f"{path}: row {local} is a zero vector or holds NaN/infinite values; it cannot be searched")
    off = np.abs(norms - 1) > UNIT_TOLERANCE
    if off.any():
        shards = sorted({str(where[i][0]) for i in np.flatnonzero(off)})
        log.warning(
            "%d of %d %s vectors are not unit length (norms %.3g to %.3g, in %s); normalised",
            int(off.sum()),
            len(vectors),
            kind,
            float(norms.min()),
            float(norms.max()),
            ", ".join(shards[:3]),
        )
    return (vectors / norms[:, None]).astype(np.float32), where


def _sample(count: int, size: int = VERIFY_SAMPLES) -> np.ndarray:
    return np.sort(np.random.default_rng(0).choice(count, size=min(size, count), replace=False))


def check_images(
    refs: Sequence[ImageRef], vectors: np.ndarray, where: list[tuple[Path, int]], encoder: ImageEncoder
) -> int:
    """Encode up to 32 sampled images that can be read here; EncoderMismatchError if one disagrees. Returns how many."""
    readable = [n for n, ref in enumerate(refs) if ref.path is not None]
    chosen, pictures = [], []
    for n in (readable[i] for i in _sample(len(readable), VERIFY_SAMPLES * 2)):
        try:
            pictures.append(refs[n].load().image)
            chosen.append(n)
        except ImageDecodeError:
            continue
        if len(chosen) == VERIFY_SAMPLES:
            break
    if not chosen:
        if len(refs):
            log.warning(
                "no image of the embedding folder can be read here; the image vectors were not checked against %s",
                encoder.spec,
            )
        return 0
    _compare(encoder.encode_images(pictures), vectors[chosen], [where[n] for n in chosen], encoder.spec, "image")
    return len(chosen)


def check_texts(texts: Sequence[str], vectors: np.ndarray, where: list[tuple[Path, int]], encoder: TextEncoder) -> int:
    """Encode up to 32 sampled captions; EncoderMismatchError if one disagrees. Returns how many."""
    chosen = [int(n) for n in _sample(len(texts))]
    if chosen:
        _compare(
            encoder.encode_texts([texts[n] for n in chosen]),
            vectors[chosen],
            [where[n] for n in chosen],
            encoder.spec,
            "caption",
        )
    return len(chosen)


def _compare(fresh: np.ndarray, stored: np.ndarray, where: list[tuple[Path, int]], spec: str, what: str) -> None:
    cosines = np.sum(np.asarray(fresh, np.float32) * stored, axis=1) / np.maximum(np.linalg.norm(fresh, axis=1), 1e-12)
    worst = int(np.argmin(cosines))
    if cosines[worst] < MIN_COSINE:
        path, local = where[worst]
        raise EncoderMismatchError(
            f"{path}: these embeddings were not made with {spec}: the {what} of row {local}, encoded again, has cosine "
            f"{cosines[worst]:.3f} with its stored vector (at least {MIN_COSINE} expected; {len(cosines)} checked)"
        )
