"""The write stage of a build: items and their vectors -> an index directory.

Tables of items, vector sets with their FAISS indexes, ASIF anchors and relative rows, and
the manifest, committed last and atomically (see :mod:`retrieval.store`). The vectors can
come from :func:`retrieval.api.build.embed_items` or from anywhere else (precomputed, a
distributed builder): :class:`~retrieval.embed.embedded.EmbeddedItems` is a plain dataclass.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.asif.anchors import AnchorSpaces, asif_params_for
from retrieval.asif.pooling import relative_of_views
from retrieval.asif.relative import AsifParams, SparseRelativeIndex
from retrieval.core.config import CaptionOptions, IndexOptions
from retrieval.core.errors import EncoderMismatchError, InputError
from retrieval.core.version import __version__
from retrieval.embed.embedded import EmbeddedItems, ImageRow
from retrieval.embed.resume import remove_work, work_root
from retrieval.index.vector_sets import VectorSet, sample_queries, write_vector_sets
from retrieval.sources.items import CaptionRecord
from retrieval.store.item_metadata import METADATA_COLUMN, metadata_array
from retrieval.store.layout import MANIFEST_NAME, is_leftover_name
from retrieval.store.locking import writer_lock
from retrieval.store.writer import StoreWriter

if TYPE_CHECKING:
    import pyarrow as pa


NEED_ANCHORS = (
    "unimodal encoders need an anchor set for cross-modal search: `anchors` (an anchor directory made by "
    "build-anchors, or builtin:imagenet)"
)


@dataclass(frozen=True)
class WriteOptions:
    """What the write stage needs besides the vectors.

    ``anchors`` is required when the vectors are not in one shared space (unimodal encoders):
    cross-modal search then goes through ASIF with ``asif`` (default: the first anchor set's).
    ``sources``, ``caption_options`` and ``checkpoint`` are recorded in the manifest;
    ``started`` (a ``time.perf_counter()`` value) dates the build's ``seconds``.
    ``ray`` (:class:`~retrieval.embed.ray_pipeline.RayOptions`): IVF indexes are filled in parallel Ray
    tasks and their lists merged (:mod:`retrieval.index.ray_shards`); the index is the same.
    """

    anchors: AnchorSpaces | None = None
    asif: AsifParams | None = None
    index_options: IndexOptions = IndexOptions()
    caption_options: CaptionOptions = CaptionOptions()
    sources: dict[str, list[str]] = field(default_factory=lambda: {"images": [], "captions": []})
    checkpoint: str | None = None
    progress: bool = True
    started: float | None = None
    ray: Any = None
    image_views: str = "none"  # "five": image relative rows pooled over crops (needs EmbeddedItems.view_vectors)


def prepare_target(index: Path, name: str = "index") -> None:
    """Refuse to write into a folder that holds something other than an index (``name``: the caller's
    parameter naming it, for the error)."""
    if index.exists() and not index.is_dir():
        raise InputError(f"{index}: exists and is not a directory")
    if index.is_dir() and any(index.iterdir()) and not (index / MANIFEST_NAME).exists():
        leftovers = all(is_leftover_name(p.name) for p in index.iterdir())
        if not leftovers:
            raise InputError(f"{index}: exists, is not empty and is not an index; choose another `{name}` path")


def write_index(embedded: EmbeddedItems, index: str | Path, options: WriteOptions = WriteOptions()) -> Path:
    """Write ``embedded`` as the index directory ``index`` under its writer lock; returns its path.

    A previous index there stays readable until the new manifest is committed.
    """
    index = Path(index)
    _check(embedded, options)
    prepare_target(index)
    with writer_lock(index):
        commit_index(embedded, index, options)
    return index


def commit_index(embedded: EmbeddedItems, index: Path, options: WriteOptions) -> None:
    """:func:`write_index` for a caller that already holds the writer lock of ``index``."""
    started = options.started if options.started is not None else time.perf_counter()
    _check(embedded, options)
    image_vectors = np.asarray(embedded.image_vectors, np.float32)
    caption_vectors = np.asarray(embedded.caption_vectors, np.float32)
    writer = StoreWriter(index, kind="index")
    files: dict[str, Any] = {
        "items": {
            "image": writer.write_table("images", image_table(embedded.images)),
            "caption": writer.write_table("captions", caption_table(embedded.captions)),
        },
        "vectors": {},
        "faiss": {},
    }
    manifest = _manifest(embedded, options)
    image_space, text_space = manifest["spaces"]["image"], manifest["spaces"]["caption"]
    sets = _vector_sets(image_space, text_space, image_vectors, caption_vectors)
    if options.anchors is not None:
        params = asif_params_for(options.anchors.sets, options.asif)
        views = embedded.view_vectors if options.image_views != "none" else None
        sets += _write_asif(writer, files, manifest, options.anchors, params, image_vectors, caption_vectors, views)
        manifest["image_views"] = options.image_views
    write_vector_sets(
        writer, files, manifest, sets, options.index_options, options.progress, _distributed(index, options)
    )
    stats = embedded.stats
    manifest["build"] = {
        "seconds": round(time.perf_counter() - started, 3),
        "images_per_second": stats.images_per_second,
        "images_resumed": stats.resumed,
        "device": stats.device,
        "workers": stats.workers,
        "encoder_replicas": stats.replicas,
        "decode": stats.decode,
        "startup_seconds": stats.startup_seconds,
        "steady_images_per_second": stats.steady_images_per_second,
    }
    manifest["files"] = files
    writer.commit(manifest, (error.to_json() for error in embedded.errors))
    remove_work(index)  # the progress shards served their purpose: the index is committed


def _distributed(index: Path, options: WriteOptions) -> Any:
    """How a Ray build fills its IVF indexes (part files in the index's work folder), or None."""
    if options.ray is None:
        return None
    from retrieval.index.ray_shards import RayIndexBuild

    return RayIndexBuild(options.ray, work_root(index) / "index-parts")


def _check(embedded: EmbeddedItems, options: WriteOptions) -> None:
    embedded.check()
    if not embedded.shared_space and options.anchors is None:
        raise InputError(NEED_ANCHORS)
    if options.image_views != "none" and (
        options.anchors is None or embedded.view_vectors is None or len(embedded.view_vectors) != len(embedded.images)
    ):
        raise InputError(f"image views {options.image_views!r} need anchors and one set of view vectors per image")
    for anchor_set in options.anchors.sets if options.anchors is not None else ():
        for role in ("image", "text"):
            recorded, used = getattr(anchor_set, f"{role}_encoder"), embedded.encoders[role]
            if (recorded.get("dim"), recorded.get("fingerprint")) != (used["dim"], used["fingerprint"]):
                raise EncoderMismatchError(
                    f"anchor set {anchor_set.name} ({role} side) was embedded with {recorded.get('spec')} (dim "
                    f"{recorded.get('dim')}, weights {recorded.get('fingerprint')}), the vectors with {used['spec']} "
                    f"(dim {used['dim']}, weights {used['fingerprint']})"
                )


def _manifest(embedded: EmbeddedItems, options: WriteOptions) -> dict[str, Any]:
    """The manifest's description of the build (the store adds format, ids and checksums)."""
    image_space, text_space = ("clip", "clip") if embedded.shared_space else ("image", "text")
    counts = {"image": len(embedded.images), "caption": len(embedded.captions)}
    return {
        "tool": {"name": "retrieval", "version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "clip" if embedded.shared_space else "asif",
        "encoders": {"image": dict(embedded.encoders["image"]), "text": dict(embedded.encoders["text"])},
        "checkpoint": str(Path(options.checkpoint).resolve()) if options.checkpoint else None,
        "metric": "inner_product",
        "spaces": {"image": image_space, "caption": text_space},
        "counts": counts,
        "rows": dict(counts),
        "index": options.index_options.to_json(),
        "sources": {"images": [], "captions": [], **{key: list(value) for key, value in options.sources.items()}},
        "caption_options": options.caption_options.to_json(),
        "routes": ["clip"],
    }


def added_column(count: int) -> pa.Array:
    """The ``added`` column of ``count`` items written now: today's date (UTC) as ISO text (``2024-05-31``:
    plain JSON wherever rows are shown); ``where`` filters see it as a DATE."""
    import datetime

    import pyarrow as pa

    return pa.array([datetime.datetime.now(datetime.timezone.utc).date().isoformat()] * count, pa.string())


def image_table(rows: Sequence[ImageRow]) -> pa.Table:
    """The items table of images (``metadata``: each item's source fields as JSON, null when none; ``added``: the
    date)."""
    import pyarrow as pa

    return pa.table(
        {
            "id": [row.ref.id for row in rows],
            "kind": ["image"] * len(rows),
            "uri": [row.ref.location for row in rows],
            "width": pa.array([row.width for row in rows], pa.int32()),
            "height": pa.array([row.height for row in rows], pa.int32()),
            "sha256": pa.array([row.sha256 for row in rows], pa.string()),
            "source": [row.ref.source for row in rows],
            "label": pa.array([row.ref.label for row in rows], pa.string()),
            "added": added_column(len(rows)),
            METADATA_COLUMN: metadata_array([row.ref.metadata for row in rows]),
        }
    )


def caption_table(captions: Sequence[CaptionRecord]) -> pa.Table:
    """The items table of captions (``metadata`` as for images)."""
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
            "added": added_column(len(captions)),
            METADATA_COLUMN: metadata_array([record.metadata for record in captions]),
        }
    )


def _vector_sets(
    image_space: str, text_space: str, image_vectors: np.ndarray, caption_vectors: np.ndarray
) -> list[VectorSet]:
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


def _write_asif(
    writer: StoreWriter,
    files: dict[str, Any],
    manifest: dict[str, Any],
    spaces: AnchorSpaces,
    params: AsifParams,
    image_vectors: np.ndarray,
    caption_vectors: np.ndarray,
    view_vectors: np.ndarray | None = None,
) -> list[VectorSet]:
    """Anchors (copied in, so the index is self-contained), sparse relative rows; returns the projected vector sets."""
    files["anchors"] = [
        {
            "image": writer.write_array("anchors", f"image-{n}", anchor_set.image_vectors.astype(np.float32)),
            "text": writer.write_array("anchors", f"text-{n}", anchor_set.text_vectors.astype(np.float32)),
        }
        for n, anchor_set in enumerate(spaces.sets)
    ]
    image_rows = (
        spaces.relative(image_vectors, "image", params)
        if view_vectors is None
        else relative_of_views(spaces, view_vectors, params)
    )
    caption_rows = spaces.relative(caption_vectors, "text", params)
    files["relative"] = {
        "image": writer.write_sparse("image", SparseRelativeIndex(image_rows)),
        "caption": writer.write_sparse("caption", SparseRelativeIndex(caption_rows)),
    }
    manifest["anchors"] = [
        {
            "name": a.name,
            "count": len(a),
            "weight": w,
            "texts": a.texts,
            "image_encoder": a.image_encoder,
            "text_encoder": a.text_encoder,
        }
        for a, w in zip(spaces.sets, spaces.weights, strict=True)
    ]
    manifest["asif"] = params.to_json()
    manifest["routes"] = ["asif", "projected"]
    # images projected into the text encoder's space answer raw text queries (recall measured with
    # the captions' text vectors), and captions projected into the image space answer image queries
    return [
        projected_set("image", spaces.project(image_rows, "text"), caption_vectors, "captions"),
        projected_set("caption", spaces.project(caption_rows, "image"), image_vectors, "images"),
    ]
