"""Incremental updates of a built index: ``add`` new items, ``remove`` items by id or path.

Both are new builds of the directory format: the files that do not change (old
vector shards, anchors) are carried into the new manifest by reference, the
changed ones are written under the new build id, and the manifest is replaced
atomically last. A reader sees the old state or the new one, never a mix (see
:mod:`retrieval.store`), and a killed update leaves the old index intact.

- ``add`` encodes only the new items. Their vectors are appended to the FAISS
  indexes as they are; a trained index (IVF lists, PQ codebooks) is retrained
  from the stored vectors only when :func:`retrieval.index.vector_sets.needs_retraining`
  says the data drifted (new vectors much farther from the list centroids than
  the training data) or the collection grew past 4x its size at training.
  Recall is then measured again and the search knobs re-tuned. Nothing new (every item already
  present, or unreadable) commits nothing: the report says so.
- ``remove`` marks rows deleted (a small array per kind); searches exclude them
  with a FAISS ID selector, so no index is rebuilt. Once more than
  ``COMPACT_FRACTION`` of a kind is deleted, that kind is compacted: its rows
  are rewritten without the deleted ones and its indexes refilled (no retraining).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.api.build import Collection, embed_items, gather_items, ray_options_for
from retrieval.api.engine import Index, open_index
from retrieval.api.update_build import KINDS, UpdateBuild
from retrieval.asif.pooling import relative_of_views
from retrieval.core.config import CaptionOptions
from retrieval.core.errors import InputError
from retrieval.embed.embedded import EmbeddedItems
from retrieval.embed.pipeline import EmbedOptions
from retrieval.embed.resume import remove_work
from retrieval.store.locking import writer_lock

if TYPE_CHECKING:
    from retrieval.embed.ray_cluster import RayOptions

COMPACT_FRACTION = 0.25


@dataclass
class UpdateReport:
    """What an ``add`` or ``remove`` did."""

    operation: str
    added: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    already_present: dict[str, int] = field(default_factory=dict)
    not_found: list[str] = field(default_factory=list)
    skipped: int = 0
    retrained: dict[str, str] = field(default_factory=dict)
    compacted: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def nothing_new(self) -> bool:
        """An ``add`` that found nothing to add: every item was already in the index, or unreadable."""
        return self.operation == "add" and not any(self.added.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _prepare(index_path: str | Path, device: str) -> Index:
    index = open_index(index_path, device=device, mmap=False)
    if "vector_indexes" not in index.manifest:
        raise InputError(
            f"{index_path}: built by an older version without vector index records; rebuild it to update it"
        )
    for group, what in (
        ("faiss_shards", "index shards (`IndexOptions.shards`)"),
        ("faiss_lists", "IVF lists merged on disk (a large Ray build)"),
    ):
        if index.manifest["files"].get(group):
            raise InputError(
                f"{index_path}: its vector indexes are {what}; add and remove do not update those yet: rebuild the "
                "index"
            )
    return index


def add_to_index(
    index_path: str | Path,
    images: Sequence[str | Path] = (),
    captions: Sequence[str | Path] = (),
    caption_options: CaptionOptions = CaptionOptions(),
    embed: EmbedOptions = EmbedOptions(),
    device: str = "auto",
    ray: str | RayOptions | None = None,
) -> UpdateReport:
    """Add images and captions to a built index, encoding only the new ones (items already present are skipped).

    The new items go through the build's embed stage (:func:`retrieval.api.build.embed_items`). With
    ``ray`` (``local``, ``auto``, a cluster address or ``RayOptions``) the new images are embedded on Ray
    (``retrieval[ray]``), as ``build_index`` does with ``BuildOptions.ray``; the result is the same.
    Nothing new to add (``report.nothing_new``) commits nothing and is no error.
    """
    started = time.perf_counter()
    report = UpdateReport("add")
    with writer_lock(index_path):
        old = _prepare(index_path, device)
        collection = gather_items(images, captions, caption_options, progress=embed.progress)
        new = _new_items(old, collection, report)
        report.added = {"image": 0, "caption": 0}
        report.skipped, report.counts = len(new.errors), dict(old.manifest["counts"])
        if new.images or new.captions:  # else no encoder loads: rerunning an add with nothing new stays cheap
            ray_options = ray_options_for(ray, old.encoder_choice())
            embedded = embed_items(  # resumable in the index's work folder, here or on Ray
                new, old.image_encoder, old.text_encoder, embed, old.path, ray_options, old.image_views
            )
            report.skipped = len(embedded.errors)
            report.added = {"image": len(embedded.images), "caption": len(embedded.captions)}
            if not report.nothing_new:  # else every new image was unreadable
                report.counts = _commit_add(old, embedded, report)
        remove_work(old.path)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _commit_add(old: Index, embedded: EmbeddedItems, report: UpdateReport) -> dict[str, int]:
    """The new build with ``embedded`` appended, committed; returns its counts."""
    update = UpdateBuild(old)
    new_vectors, relative_rows = _new_vectors(old, embedded)
    update.append_items(embedded, relative_rows)
    for key, vectors in new_vectors.items():
        report.retrained.update(update.append_vectors(key, vectors))
    update.remeasure_all()
    errors = old.errors() + [error.to_json() for error in embedded.errors]
    update.commit({"op": "add", "at": _now(), **report.added, "retrained": report.retrained}, errors)
    return dict(update.manifest["counts"])


def _new_items(old: Index, collection: Collection, report: UpdateReport) -> Collection:
    """The items of ``collection`` not in ``old`` yet (by id; deleted ones count as absent), with its errors;
    ``report.already_present`` counts the others."""
    present = {kind: set(np.asarray(old.items(kind)["id"], dtype=object)[old.live(kind)]) for kind in KINDS}
    new = Collection(
        images=[ref for ref in collection.images if ref.id not in present["image"]],
        captions=[record for record in collection.captions if record.id not in present["caption"]],
        errors=collection.errors,
    )
    report.already_present = {
        "image": len(collection.images) - len(new.images),
        "caption": len(collection.captions) - len(new.captions),
    }
    return new


def _new_vectors(old: Index, embedded: EmbeddedItems) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The rows each vector set gains (projected through the anchors for an ASIF index) and the new relative rows
    (the images' pooled over their crops for an index with ``image_views``)."""
    spaces = old.manifest["spaces"]
    image_vectors, caption_vectors = embedded.image_vectors, embedded.caption_vectors
    vectors = {f"{spaces['image']}/image": image_vectors, f"{spaces['caption']}/caption": caption_vectors}
    relative_rows: dict[str, Any] = {}
    if old.mode == "asif":
        anchor_spaces = old.anchor_spaces
        relative_rows = {
            "image": anchor_spaces.relative(image_vectors, "image", old.asif_params)
            if embedded.view_vectors is None
            else relative_of_views(anchor_spaces, embedded.view_vectors, old.asif_params),
            "caption": anchor_spaces.relative(caption_vectors, "text", old.asif_params),
        }
        vectors["projected/image"] = anchor_spaces.project(relative_rows["image"], "text")
        vectors["projected/caption"] = anchor_spaces.project(relative_rows["caption"], "image")
    return vectors, relative_rows


def remove_from_index(
    index_path: str | Path, ids: Sequence[str] = (), paths: Sequence[str | Path] = (), device: str = "cpu"
) -> UpdateReport:
    """Delete items by id, or by path (images whose file is ``path``; captions read from the caption file ``path``)."""
    started = time.perf_counter()
    if not ids and not paths:
        raise InputError("nothing to remove: give `ids` and/or `paths`")
    report = UpdateReport("remove")
    with writer_lock(index_path):
        old = _prepare(index_path, device)
        update = UpdateBuild(old)
        new_deleted = _matches(old, set(ids), {_resolved(p) for p in paths}, report)
        if not any(len(v) for v in new_deleted.values()):
            raise InputError(
                f"{index_path}: nothing to remove; not in the index (or already removed): {', '.join(report.not_found)}"
            )
        report.removed = {kind: len(new_deleted[kind]) for kind in KINDS}
        update.deleted = {kind: np.union1d(update.deleted[kind], new_deleted[kind]).astype(np.int64) for kind in KINDS}
        compact = [kind for kind in KINDS if len(update.deleted[kind]) > COMPACT_FRACTION * max(update.rows[kind], 1)]
        update.carry_for_remove(compact)
        for kind in compact:
            update.compact(kind)
        report.compacted = compact
        for key in update.manifest["vector_indexes"]:
            update.built.setdefault(key, update.load(key))  # compacted ones were refilled already
        update.remeasure_all()
        update.commit({"op": "remove", "at": _now(), **report.removed, "compacted": compact}, old.errors())
        report.counts = update.manifest["counts"]
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _matches(old: Index, wanted_ids: set[str], wanted_paths: set[str], report: UpdateReport) -> dict[str, np.ndarray]:
    """Live positions of each kind whose id or path was asked for; ``report.not_found`` names the others."""
    matched: set[str] = set()
    new_deleted: dict[str, np.ndarray] = {}
    for kind in KINDS:
        table = old.items(kind)
        live = old.live(kind)
        hits = []
        for position, item_id in enumerate(table["id"]):
            where = table["uri"][position] if kind == "image" else table["source"][position]
            resolved = _resolved(where) if wanted_paths and where is not None else None  # no file lookups by id
            by_path = resolved in wanted_paths
            if item_id in wanted_ids or by_path:
                matched.add(item_id)
                if by_path:
                    matched.add(f"path:{resolved}")
                if live[position]:
                    hits.append(position)
        new_deleted[kind] = np.asarray(hits, np.int64)
    report.not_found = sorted(wanted_ids - matched) + sorted(p for p in wanted_paths if f"path:{p}" not in matched)
    return new_deleted


def _resolved(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
