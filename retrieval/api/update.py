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
  Recall is then measured again and the search knobs re-tuned.
- ``remove`` marks rows deleted (a small array per kind); searches exclude them
  with a FAISS ID selector, so no index is rebuilt. Once more than
  ``COMPACT_FRACTION`` of a kind is deleted, that kind is compacted: its rows
  are rewritten without the deleted ones and its indexes refilled (no retraining).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.api.build import gather_items, ray_options_for
from retrieval.api.engine import Index, open_index
from retrieval.api.write import caption_table, image_table
from retrieval.asif.pooling import relative_of_views
from retrieval.asif.relative import SparseRelativeIndex
from retrieval.core.config import CaptionOptions, IndexOptions
from retrieval.core.errors import InputError
from retrieval.embed.pipeline import EmbedOptions, embed_images
from retrieval.embed.resume import remove_work
from retrieval.embed.views import embed_views
from retrieval.index.recall import RECALL_QUERIES
from retrieval.index.source import RowSubset, VectorSource
from retrieval.index.vector_index import (
    Exclusions,
    add_vectors,
    build_vector_index,
    empty_copy,
)
from retrieval.index.vector_sets import (
    VectorSet,
    choose,
    mean_residual,
    measure,
    needs_retraining,
    query_key,
    spec_of,
)
from retrieval.store.item_metadata import append_rows
from retrieval.store.locking import writer_lock
from retrieval.store.writer import StoreWriter

log = logging.getLogger(__name__)

COMPACT_FRACTION = 0.25
KINDS = ("image", "caption")


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Update:
    """The new build of an update: carries what is unchanged, writes what changed, commits."""

    def __init__(self, index: Index) -> None:
        self.old = index
        self.store = index.store
        self.manifest = {
            key: value
            for key, value in index.manifest.items()
            if key not in ("format", "kind", "build_id", "checksums", "errors", "errors_file", "manifest_sha256")
        }
        self.files: dict[str, Any] = index.manifest["files"]
        self.writer = StoreWriter(index.path, kind="index")
        self.new_files: dict[str, Any] = {"items": {}, "vectors": {}, "faiss": {}}
        self.rows = dict(index.manifest.get("rows") or index.manifest["counts"])
        self.deleted = {kind: index.deleted(kind) for kind in KINDS}
        self.new_sources: dict[str, VectorSource] = {}  # vector sets whose rows changed in this update
        self.built: dict[str, Any] = {}  # FAISS indexes to measure before the commit

    def carry(self, rel: str) -> str:
        return self.writer.carry(rel, self.store.manifest["checksums"][rel])

    def carry_tree(self, node: Any) -> Any:
        if isinstance(node, str):
            return self.carry(node)
        if isinstance(node, list):
            return [self.carry_tree(child) for child in node]
        if isinstance(node, dict):
            return {key: self.carry_tree(value) for key, value in node.items()}
        return node

    def source(self, key: str) -> VectorSource:
        return self.store.vector_source(self.files["vectors"][key])

    def options(self) -> IndexOptions:
        return IndexOptions.from_json(self.manifest.get("index"))

    def exclusions(self, kind: str) -> Exclusions | None:
        deleted = self.deleted[kind]
        return Exclusions(deleted, self.rows[kind]) if len(deleted) else None

    def remeasure(self, key: str, index: Any, source: VectorSource, record: dict[str, Any]) -> dict[str, Any]:
        """The manifest record of ``key`` after the update: recall measured again, knobs re-tuned."""
        live = {kind: self.rows[kind] - len(self.deleted[kind]) for kind in KINDS}
        query_from, query_name = query_key(key, self.manifest["spaces"], live)
        query_source = source if query_from == key else self.query_source(query_from)
        queries = query_source.sample(RECALL_QUERIES, seed=1)
        report = measure(
            index,
            spec_of(record),
            VectorSet(key, source, queries, query_name),
            self.options().target_recall,
            self.exclusions(key.split("/")[1]),
        )
        return {**record, "count": len(source), "measured": report.to_json() if report else None}

    def query_source(self, key: str) -> VectorSource:
        return self.new_sources.get(key) or self.source(key)

    def write_index(self, key: str, index: Any) -> None:
        space, kind = key.split("/")
        self.new_files["faiss"][key] = self.writer.write_faiss(f"{space}-{kind}", index)

    def commit(self, operation: dict[str, Any], errors: list[dict[str, Any]]) -> None:
        """Write the manifest naming only what this update carried or wrote (the commit point)."""
        missing = set(self.files) - set(self.new_files) - {"deleted"}
        if missing:
            raise RuntimeError(f"update left out {sorted(missing)}")  # a bug here, never a half-carried index
        files = {name: value for name, value in self.new_files.items() if value or name != "deleted"}
        self.manifest["files"] = files
        self.manifest["rows"] = self.rows
        self.manifest["counts"] = {kind: self.rows[kind] - len(self.deleted[kind]) for kind in KINDS}
        self.manifest.setdefault("updates", []).append(operation)
        self.writer.commit(self.manifest, errors)


def _prepare(index_path: str | Path, device: str) -> Index:
    index = open_index(index_path, device=device, mmap=False)
    if "vector_indexes" not in index.manifest:
        raise InputError(
            f"{index_path}: built by an older version without vector index records; rebuild it to update it"
        )
    for group, what in (
        ("faiss_shards", "index shards (--index-shards)"),
        ("faiss_lists", "IVF lists merged on disk (a large Ray build)"),
    ):
        if index.manifest["files"].get(group):
            raise InputError(
                f"{index_path}: its vector indexes are {what}; add and remove do not update those yet: rebuild the "
                "index"
            )
    return index


def _embed_new_images(old: Index, images: list, embed: EmbedOptions, ray: Any) -> Any:
    """The new images' vectors, here or on Ray; resumable either way (the index's work folder)."""
    if ray is None:
        return embed_images(images, old.image_encoder, embed, work_dir=old.path)
    from retrieval.embed.ray_pipeline import embed_images_on_ray

    return embed_images_on_ray(images, old.image_encoder, embed, old.path, ray_options_for(ray, old.encoder_choice()))


def add_to_index(
    index_path: str | Path,
    images: Sequence[str | Path] = (),
    captions: Sequence[str | Path] = (),
    caption_options: CaptionOptions = CaptionOptions(),
    embed: EmbedOptions = EmbedOptions(),
    device: str = "auto",
    ray: Any = None,
) -> UpdateReport:
    """Add images and captions to a built index, encoding only the new ones (items already present are skipped).

    With ``ray`` (``local``, ``auto``, a cluster address or ``RayOptions``) the new images are embedded
    on Ray (``retrieval[ray]``), as ``build_index(ray=...)`` does; the result is the same.
    """
    started = time.perf_counter()
    report = UpdateReport("add")
    with writer_lock(index_path):
        old = _prepare(index_path, device)
        update = _Update(old)
        collection = gather_items(images, captions, caption_options, progress=embed.progress)
        present = {kind: set(np.asarray(old.items(kind)["id"], dtype=object)[_live_mask(old, kind)]) for kind in KINDS}
        new_images = [ref for ref in collection.images if ref.id not in present["image"]]
        new_captions = [record for record in collection.captions if record.id not in present["caption"]]
        report.already_present = {
            "image": len(collection.images) - len(new_images),
            "caption": len(collection.captions) - len(new_captions),
        }
        embedded = _embed_new_images(old, new_images, embed, ray)
        texts = [record.text for record in new_captions]
        caption_vectors = (
            old.text_encoder.encode_texts(texts, progress=embed.progress)
            if texts
            else np.zeros((0, old.text_encoder.dim), np.float32)
        )
        report.skipped = len(collection.errors) + len(embedded.errors)
        views = (
            embed_views([row.ref for row in embedded.rows], old.image_encoder, old.image_views)
            if old.image_views != "none"
            else None
        )
        new_vectors, relative_rows = _new_vectors(old, embedded.vectors, caption_vectors, views)
        if not len(embedded.rows) and not texts:
            raise InputError(
                "nothing new to add: every item is already in the index or could not be read"
                if report.already_present
                else "nothing to add"
            )
        _append_items(update, old, embedded, new_captions, relative_rows)
        _carry_unchanged(update)
        for key, vectors in new_vectors.items():
            report.retrained.update(_append_vectors(update, key, vectors))
        update.rows = {
            "image": update.rows["image"] + len(embedded.rows),
            "caption": update.rows["caption"] + len(texts),
        }
        _remeasure_all(update)
        report.added = {"image": len(embedded.rows), "caption": len(texts)}
        errors = old.errors() + [error.to_json() for error in collection.errors + embedded.errors]
        update.commit({"op": "add", "at": _now(), **report.added, "retrained": report.retrained}, errors)
        remove_work(old.path)
        report.counts = update.manifest["counts"]
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _live_mask(index: Index, kind: str) -> np.ndarray:
    mask = np.ones(index.rows(kind), bool)
    mask[index.deleted(kind)] = False
    return mask


def _new_vectors(
    old: Index, image_vectors: np.ndarray, caption_vectors: np.ndarray, view_vectors: np.ndarray | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The rows each vector set gains (projected through the anchors for an ASIF index) and the new relative rows.

    ``view_vectors``: the new images' crops, for an index whose image rows pool views (``image_views``)."""
    spaces = old.manifest["spaces"]
    vectors = {f"{spaces['image']}/image": image_vectors, f"{spaces['caption']}/caption": caption_vectors}
    relative_rows: dict[str, Any] = {}
    if old.mode == "asif":
        anchor_spaces = old.anchor_spaces
        relative_rows = {
            "image": anchor_spaces.relative(image_vectors, "image", old.asif_params)
            if view_vectors is None
            else relative_of_views(anchor_spaces, view_vectors, old.asif_params),
            "caption": anchor_spaces.relative(caption_vectors, "text", old.asif_params),
        }
        vectors["projected/image"] = anchor_spaces.project(relative_rows["image"], "text")
        vectors["projected/caption"] = anchor_spaces.project(relative_rows["caption"], "image")
    return vectors, relative_rows


def _append_items(
    update: _Update, old: Index, embedded: Any, captions: Sequence[Any], relative_rows: dict[str, Any]
) -> None:
    tables = {"image": image_table(embedded.rows), "caption": caption_table(captions)}
    for kind, table in tables.items():
        previous = update.store.read_table(update.files["items"][kind])
        merged = append_rows(previous, table)  # an index from before the metadata column gains it
        update.new_files["items"][kind] = update.writer.write_table(f"{kind}s", merged)
    if relative_rows:
        import scipy.sparse as sp

        update.new_files["relative"] = {}
        for kind in KINDS:
            rows = sp.vstack([old.relative_index(kind).rows, relative_rows[kind]]).tocsr()
            update.new_files["relative"][kind] = update.writer.write_sparse(kind, SparseRelativeIndex(rows))


def _carry_unchanged(update: _Update) -> None:
    """Files no update changes: anchors; the deleted arrays (positions do not move on append)."""
    if "anchors" in update.files:
        update.new_files["anchors"] = update.carry_tree(update.files["anchors"])
    deleted = update.files.get("deleted") or {}
    update.new_files["deleted"] = {kind: update.carry(rel) for kind, rel in deleted.items()}


def _append_vectors(update: _Update, key: str, vectors: np.ndarray) -> dict[str, str]:
    """Carry ``key``'s old shards, write the new rows, add them to its FAISS index (retraining if needed)."""
    space, kind = key.split("/")
    old_shards = update.files["vectors"][key]
    shards = [update.carry(rel) for rel in old_shards]
    shards += update.writer.write_vectors(space, kind, vectors, first_shard=len(old_shards)) if len(vectors) else []
    update.new_files["vectors"][key] = shards
    source = update.store.vector_source(old_shards)
    full = VectorSource(source.parts + ([np.asarray(vectors, np.float32)] if len(vectors) else []))
    update.new_sources[key] = full
    record = update.manifest["vector_indexes"][key]
    index = update.store.read_faiss(update.files["faiss"][key])
    budget = record["choice"].get("budget_bytes")
    wanted = choose(update.options(), len(full), full.dim, budget)
    why = needs_retraining(record, index, vectors, len(full)) if len(vectors) else None
    if wanted.spec.type != spec_of(record).type:
        why = f"at {len(full)} vectors the index type becomes {wanted.spec.type}"
    if why:
        log.warning("%s: rebuilding the vector index from the stored vectors (%s)", key, why)
        choice = wanted
        index = build_vector_index(full, choice.spec)
        record["choice"] = {**choice.to_json(), "reason": f"rebuilt on add: {why}; {choice.reason}"}
        residual = mean_residual(index, full.sample(10_000, seed=2))
        update.manifest["vector_indexes"][key] = {**record, "trained": {"count": len(full), "mean_residual": residual}}
    elif len(vectors):
        add_vectors(index, vectors)
    update.write_index(key, index)
    update.built[key] = index
    return {key: why} if why else {}


def _remeasure_all(update: _Update) -> None:
    for key, index in update.built.items():
        record = update.manifest["vector_indexes"][key]
        source = update.new_sources.get(key) or update.source(key)
        update.manifest["vector_indexes"][key] = update.remeasure(key, index, source, record)


def remove_from_index(
    index_path: str | Path, ids: Sequence[str] = (), paths: Sequence[str | Path] = (), device: str = "cpu"
) -> UpdateReport:
    """Delete items by id, or by path (images whose file is ``path``; captions read from the caption file ``path``)."""
    started = time.perf_counter()
    if not ids and not paths:
        raise InputError("nothing to remove: give --id ID and/or --path PATH")
    report = UpdateReport("remove")
    with writer_lock(index_path):
        old = _prepare(index_path, device)
        update = _Update(old)
        wanted_ids, wanted_paths = set(ids), {_resolved(p) for p in paths}
        matched: set[str] = set()
        new_deleted: dict[str, np.ndarray] = {}
        for kind in KINDS:
            table = old.items(kind)
            live = _live_mask(old, kind)
            hits = []
            for position, item_id in enumerate(table["id"]):
                where = table["uri"][position] if kind == "image" else table["source"][position]
                by_path = where is not None and _resolved(where) in wanted_paths
                if item_id in wanted_ids or by_path:
                    matched.add(item_id)
                    if by_path:
                        matched.add(f"path:{_resolved(where)}")
                    if live[position]:
                        hits.append(position)
            new_deleted[kind] = np.asarray(hits, np.int64)
        report.not_found = sorted(set(wanted_ids) - matched) + sorted(
            str(p) for p in wanted_paths if f"path:{p}" not in matched
        )
        if not any(len(v) for v in new_deleted.values()):
            raise InputError(
                f"{index_path}: nothing to remove; not in the index (or already removed): {', '.join(report.not_found)}"
            )
        report.removed = {kind: len(new_deleted[kind]) for kind in KINDS}
        update.deleted = {kind: np.union1d(update.deleted[kind], new_deleted[kind]).astype(np.int64) for kind in KINDS}
        compact = [kind for kind in KINDS if len(update.deleted[kind]) > COMPACT_FRACTION * max(update.rows[kind], 1)]
        _carry_for_remove(update, compact)
        for kind in compact:
            _compact(update, old, kind)
        report.compacted = compact
        for key in update.manifest["vector_indexes"]:
            update.built.setdefault(key, _load(update, key))  # compacted ones were refilled already
        _remeasure_all(update)
        update.commit({"op": "remove", "at": _now(), **report.removed, "compacted": compact}, old.errors())
        report.counts = update.manifest["counts"]
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _resolved(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _load(update: _Update, key: str) -> Any:
    return update.store.read_faiss(update.files["faiss"][key])


def _carry_for_remove(update: _Update, compact: Sequence[str]) -> None:
    """Carry every file of kinds not compacted; write the new deleted arrays."""
    if "anchors" in update.files:
        update.new_files["anchors"] = update.carry_tree(update.files["anchors"])
    update.new_files["deleted"] = {}
    for kind in KINDS:
        if kind in compact:
            continue
        update.new_files["items"][kind] = update.carry(update.files["items"][kind])
        if "relative" in update.files:
            update.new_files.setdefault("relative", {})[kind] = update.carry(update.files["relative"][kind])
        if len(update.deleted[kind]):
            update.new_files["deleted"][kind] = update.writer.write_array(
                "items", f"deleted-{kind}", update.deleted[kind]
            )
    for key in update.manifest["vector_indexes"]:
        if key.split("/")[1] not in compact:
            update.new_files["vectors"][key] = [update.carry(rel) for rel in update.files["vectors"][key]]
            update.new_files["faiss"][key] = update.carry(update.files["faiss"][key])


def _compact(update: _Update, old: Index, kind: str) -> None:
    """Rewrite ``kind`` without its deleted rows: items, vectors, relative rows; refill its indexes (no retraining)."""
    live = np.flatnonzero(_live_mask_from(update.rows[kind], update.deleted[kind]))
    table = update.store.read_table(update.files["items"][kind]).take(live)
    update.new_files["items"][kind] = update.writer.write_table(f"{kind}s", table)
    if "relative" in update.files:
        rows = old.relative_index(kind).rows[live]
        update.new_files.setdefault("relative", {})[kind] = update.writer.write_sparse(kind, SparseRelativeIndex(rows))
    for key in update.manifest["vector_indexes"]:
        space, key_kind = key.split("/")
        if key_kind != kind:
            continue
        subset = RowSubset(update.source(key), live)
        update.new_files["vectors"][key] = update.writer.write_vectors(space, kind, subset)
        index = empty_copy(_load(update, key))
        add_vectors(index, subset)
        update.write_index(key, index)
        update.built[key] = index
        update.new_sources[key] = subset
    update.rows[kind] = len(live)
    update.deleted[kind] = np.zeros(0, np.int64)


def _live_mask_from(rows: int, deleted: np.ndarray) -> np.ndarray:
    mask = np.ones(rows, bool)
    mask[deleted] = False
    return mask


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
