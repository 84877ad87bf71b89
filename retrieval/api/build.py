"""Build an index directory (and anchor directories) from images and captions."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from retrieval.asif.anchors import (
    AnchorSet,
    AnchorSpaces,
    asif_params_for,
    build_anchor_set,
    resolve_anchor_set,
    save_anchor_set,
)
from retrieval.asif.relative import AsifParams, SparseRelativeIndex
from retrieval.core.config import CaptionOptions, EncoderChoice, IndexOptions
from retrieval.core.errors import InputError
from retrieval.core.version import __version__
from retrieval.embed.pipeline import EmbeddedImages, EmbedOptions, embed_images
from retrieval.embed.resume import remove_work
from retrieval.encoders.registry import load_encoders
from retrieval.index.vector_sets import VectorSet, sample_queries, write_vector_sets
from retrieval.sources.captions import read_caption_file
from retrieval.sources.discovery import discover_images
from retrieval.sources.items import CaptionRecord, ImageRef, ItemError
from retrieval.store.layout import MANIFEST_NAME, is_leftover_name
from retrieval.store.locking import writer_lock
from retrieval.store.provenance import encoder_record
from retrieval.store.writer import StoreWriter

log = logging.getLogger(__name__)

DEFAULT_INDEX = Path("index_data") / "default"


@dataclass
class Collection:
    """The images and captions of one build, with the problems met while reading them."""

    images: list[ImageRef] = field(default_factory=list)
    captions: list[CaptionRecord] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)


def gather_collection(
    images: Sequence[str | Path], captions: Sequence[str | Path], options: CaptionOptions
) -> Collection:
    """Find images and read caption files; images named by pairs files join the image collection."""
    if not images and not captions:
        raise InputError("nothing to index: give --images PATH and/or --captions FILE")
    found, skipped = discover_images(images) if images else ([], [])
    collection = Collection(images=found, errors=list(skipped))
    seen = {ref.path for ref in collection.images}
    for path in captions:
        parsed = read_caption_file(path, options.caption_column, options.image_column, options.template, options.encoding)
        collection.captions.extend(parsed.records)
        collection.errors.extend(parsed.errors)
        for record in parsed.records:
            if record.image is not None and record.image not in seen:
                seen.add(record.image)
                collection.images.append(ImageRef(path=record.image, source=str(path)))
    return collection


def _prepare_target(index: Path) -> None:
    """Refuse to write into a folder that holds something other than an index."""
    if index.exists() and not index.is_dir():
        raise InputError(f"{index}: exists and is not a directory")
    if index.is_dir() and any(index.iterdir()) and not (index / MANIFEST_NAME).exists():
        leftovers = all(is_leftover_name(p.name) for p in index.iterdir())
        if not leftovers:
            raise InputError(f"{index}: exists, is not empty and is not an index; choose another --index path")


def image_table(embedded: EmbeddedImages) -> "pa.Table":  # noqa: F821
    import pyarrow as pa

    rows = embedded.rows
    return pa.table(
        {
            "id": [row.ref.id for row in rows],
            "kind": ["image"] * len(rows),
            "uri": [str(row.ref.path) for row in rows],
            "width": pa.array([row.width for row in rows], pa.int32()),
            "height": pa.array([row.height for row in rows], pa.int32()),
            "sha256": [row.sha256 for row in rows],
            "source": [row.ref.source for row in rows],
            "label": pa.array([row.ref.label for row in rows], pa.string()),
        }
    )


def caption_table(captions: Sequence[CaptionRecord]) -> "pa.Table":  # noqa: F821
    import pyarrow as pa

    return pa.table(
        {
            "id": [record.id for record in captions],
            "kind": ["caption"] * len(captions),
            "caption": [record.text for record in captions],
            "source": [record.source for record in captions],
            "row": pa.array([record.row for record in captions], pa.int64()),
            "image_uri": pa.array([str(record.image) if record.image else None for record in captions], pa.string()),
            "image_id": pa.array([record.image_id for record in captions], pa.string()),
            "label": pa.array([record.label for record in captions], pa.string()),
        }
    )


def build_index(
    images: Sequence[str | Path] = (),
    captions: Sequence[str | Path] = (),
    index: str | Path = DEFAULT_INDEX,
    encoders: EncoderChoice | None = None,
    anchors: str | Path | Sequence[str | Path] | None = None,
    asif: AsifParams | None = None,
    caption_options: CaptionOptions = CaptionOptions(),
    embed: EmbedOptions = EmbedOptions(),
    anchor_weights: Sequence[float] | None = None,
    index_options: IndexOptions = IndexOptions(),
) -> "Index":  # noqa: F821
    """Embed images and captions and write an index directory; returns the opened index.

    With a contrastive ``encoders.clip`` model both kinds share one space. With
    unimodal ``encoders.image`` + ``encoders.text``, ``anchors`` (a directory from
    :func:`build_anchors` or ``builtin:imagenet``, or a list of them fused with
    ``anchor_weights``) is required and cross-modal search goes through ASIF
    relative representations (exact sparse route ``asif``) or their dense
    projections (route ``projected``).
    """
    from retrieval.api.engine import open_index

    started = time.perf_counter()
    if encoders is None:
        raise InputError("choose encoders: EncoderChoice(clip=...) or EncoderChoice(image=..., text=...)")
    if isinstance(anchors, (str, Path)):
        anchors = [anchors]
    if not encoders.is_contrastive and not anchors:
        raise InputError(
            "unimodal encoders need an anchor set for cross-modal search: --anchors DIR (from build-anchors) or builtin:imagenet"
        )
    index = Path(index)
    _prepare_target(index)
    with writer_lock(index):  # one build at a time: a second writer fails here, at once
        collection = gather_collection(images, captions, caption_options)
        image_encoder, text_encoder = load_encoders(encoders)
        anchor_sets = [resolve_anchor_set(str(a), image_encoder, text_encoder) for a in anchors or ()]
        spaces = AnchorSpaces(anchor_sets, anchor_weights) if anchor_sets else None
        params = asif_params_for(anchor_sets, asif) if anchor_sets else None  # open fields: the anchor sets' own

        embed_started = time.perf_counter()
        embedded = embed_images(collection.images, image_encoder, embed, work_dir=index)  # resumable: see resume.py
        images_seconds = time.perf_counter() - embed_started
        texts = [record.text for record in collection.captions]
        caption_vectors = text_encoder.encode_texts(texts, progress=embed.progress) if texts else np.zeros((0, text_encoder.dim), np.float32)
        if not len(embedded.rows) and not texts:
            raise InputError("no image could be read and no caption was given; nothing to index (see the warnings above)")

        writer = StoreWriter(index, kind="index")
        image_space, text_space = ("clip", "clip") if encoders.is_contrastive else ("image", "text")
        files: dict[str, Any] = {
            "items": {
                "image": writer.write_table("images", image_table(embedded)),
                "caption": writer.write_table("captions", caption_table(collection.captions)),
            },
            "vectors": {},
            "faiss": {},
        }
        manifest: dict[str, Any] = {
            "tool": {"name": "retrieval", "version": __version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "mode": "clip" if encoders.is_contrastive else "asif",
            "encoders": {"image": encoder_record(image_encoder), "text": encoder_record(text_encoder)},
            "checkpoint": str(Path(encoders.checkpoint).resolve()) if encoders.checkpoint else None,
            "metric": "inner_product",
            "spaces": {"image": image_space, "caption": text_space},
            "counts": {"image": len(embedded.rows), "caption": len(texts)},
            "rows": {"image": len(embedded.rows), "caption": len(texts)},
            "index": index_options.to_json(),
            "sources": {"images": [str(p) for p in images], "captions": [str(p) for p in captions]},
            "caption_options": caption_options.to_json(),
        }
        sets = _vector_sets(image_space, text_space, embedded.vectors, caption_vectors)
        manifest["routes"] = ["clip"]
        if spaces is not None:
            sets += _write_asif(writer, files, manifest, spaces, params, embedded.vectors, caption_vectors)
        write_vector_sets(writer, files, manifest, sets, index_options, embed.progress)
        total = time.perf_counter() - started
        manifest["build"] = {
            "seconds": round(total, 3),
            "images_per_second": _images_per_second(embedded, len(collection.images), images_seconds),
            "images_resumed": embedded.resumed,
            "device": image_encoder.device,
            "workers": embedded.workers,
            "encoder_replicas": embedded.replicas,
        }
        manifest["files"] = files
        errors = collection.errors + embedded.errors
        writer.commit(manifest, (error.to_json() for error in errors))
        remove_work(index)  # the progress shards served their purpose: the index is committed
    return open_index(index, device=encoders.device)


def _vector_sets(image_space: str, text_space: str, image_vectors: np.ndarray, caption_vectors: np.ndarray) -> list[VectorSet]:
    """The image and caption vector sets, each with recall queries from the other kind when it shares the space."""
    shared = image_space == text_space
    return [
        _with_queries(f"{image_space}/image", image_vectors, caption_vectors if shared else None, "captions"),
        _with_queries(f"{text_space}/caption", caption_vectors, image_vectors if shared else None, "images"),
    ]


def _with_queries(key: str, vectors: np.ndarray, others: np.ndarray | None, others_name: str) -> VectorSet:
    if others is not None and len(others):
        return VectorSet(key, vectors, sample_queries(others), others_name)
    return VectorSet(key, vectors, sample_queries(vectors), "self")


def projected_set(kind: str, projected: np.ndarray, queries_from: np.ndarray, queries_name: str) -> VectorSet:
    """The vector set of items projected into the other encoder's space."""
    return _with_queries(f"projected/{kind}", projected, queries_from, queries_name)


def _images_per_second(embedded: EmbeddedImages, total: int, seconds: float) -> float | None:
    """Embedding speed of this run; a resumed run counts only the images it embedded itself."""
    if embedded.resumed:
        fresh = total - embedded.resumed
        return round(fresh / seconds, 2) if fresh and seconds > 0 else None
    return round(len(embedded.rows) / seconds, 2) if embedded.rows else None


def _write_asif(
    writer: StoreWriter, files: dict[str, Any], manifest: dict[str, Any], spaces: AnchorSpaces, params: AsifParams,
    image_vectors: np.ndarray, caption_vectors: np.ndarray,
) -> list[VectorSet]:
    """Anchors (copied in, so the index is self-contained), sparse relative rows; returns the projected vector sets."""
    files["anchors"] = [
        {
            "image": writer.write_array("anchors", f"image-{n}", anchor_set.image_vectors.astype(np.float32)),
            "text": writer.write_array("anchors", f"text-{n}", anchor_set.text_vectors.astype(np.float32)),
        }
        for n, anchor_set in enumerate(spaces.sets)
    ]
    image_rows = spaces.relative(image_vectors, "image", params)
    caption_rows = spaces.relative(caption_vectors, "text", params)
    files["relative"] = {
        "image": writer.write_sparse("image", SparseRelativeIndex(image_rows)),
        "caption": writer.write_sparse("caption", SparseRelativeIndex(caption_rows)),
    }
    manifest["anchors"] = [
        {"name": a.name, "count": len(a), "weight": w, "image_encoder": a.image_encoder, "text_encoder": a.text_encoder}
        for a, w in zip(spaces.sets, spaces.weights)
    ]
    manifest["asif"] = params.to_json()
    manifest["routes"] = ["asif", "projected"]
    # images projected into the text encoder's space answer raw text queries (recall measured with
    # the captions' text vectors), and captions projected into the image space answer image queries
    return [
        projected_set("image", spaces.project(image_rows, "text"), caption_vectors, "captions"),
        projected_set("caption", spaces.project(caption_rows, "image"), image_vectors, "images"),
    ]


def build_anchors(
    pairs: Sequence[str | Path],
    out: str | Path,
    image_encoder: str,
    text_encoder: str,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    caption_options: CaptionOptions = CaptionOptions(),
    embed: EmbedOptions = EmbedOptions(),
    asif: AsifParams | None = None,
    cache_dir: str | Path | None = None,
) -> AnchorSet:
    """Embed (image, caption) pairs with two unimodal encoders and save them as an anchor directory.

    With ``cache_dir``, embeddings are reused from (and added to) the embedding cache.
    """
    from retrieval.asif.anchors import DEFAULT_PARAMS, load_anchor_set

    out = Path(out)
    _prepare_target(out)
    with writer_lock(out):
        image_model, text_model = load_encoders(EncoderChoice(image=image_encoder, text=text_encoder, checkpoint=str(checkpoint) if checkpoint else None, device=device))
        anchor_set, errors = build_anchor_set(pairs, image_model, text_model, caption_options, embed, asif or DEFAULT_PARAMS, cache_dir)
        save_anchor_set(anchor_set, out, errors)
    return load_anchor_set(out)
