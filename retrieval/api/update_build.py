"""The new build of an index that an update makes: what is unchanged is carried into the new manifest by
reference, what changed is written under the new build id, and the manifest commits it (see
:mod:`retrieval.api.update` for ``add`` and ``remove``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval.api.engine import Index
from retrieval.api.write import caption_table, image_table
from retrieval.asif.relative import SparseRelativeIndex
from retrieval.core.config import IndexOptions
from retrieval.embed.embedded import EmbeddedItems
from retrieval.index.recall import RECALL_QUERIES
from retrieval.index.selection import live_mask
from retrieval.index.source import RowSubset, VectorSource
from retrieval.index.vector_index import Exclusions, add_vectors, build_vector_index, empty_copy
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
from retrieval.store.writer import StoreWriter

log = logging.getLogger(__name__)

KINDS = ("image", "caption")


class UpdateBuild:
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

    def load(self, key: str) -> Any:
        return self.store.read_faiss(self.files["faiss"][key])

    def carry_anchors(self) -> None:
        """The anchors: no update changes them."""
        if "anchors" in self.files:
            self.new_files["anchors"] = self.carry_tree(self.files["anchors"])

    def append_items(self, embedded: EmbeddedItems, relative_rows: dict[str, Any]) -> None:
        """The item tables and relative rows with the new items after the old ones; the rest carried over."""
        tables = {"image": image_table(embedded.images), "caption": caption_table(embedded.captions)}
        for kind, table in tables.items():
            previous = self.store.read_table(self.files["items"][kind])
            merged = append_rows(previous, table)  # an index from before the metadata column gains it
            self.new_files["items"][kind] = self.writer.write_table(f"{kind}s", merged)
        if relative_rows:
            import scipy.sparse as sp

            self.new_files["relative"] = {}
            for kind in KINDS:
                rows = sp.vstack([self.old.relative_index(kind).rows, relative_rows[kind]]).tocsr()
                self.new_files["relative"][kind] = self.writer.write_sparse(kind, SparseRelativeIndex(rows))
        self.carry_anchors()
        deleted = self.files.get("deleted") or {}  # positions do not move on append
        self.new_files["deleted"] = {kind: self.carry(rel) for kind, rel in deleted.items()}
        self.rows = {kind: self.rows[kind] + len(tables[kind]) for kind in KINDS}

    def append_vectors(self, key: str, vectors: np.ndarray) -> dict[str, str]:
        """Carry ``key``'s old shards, write the new rows, add them to its FAISS index (retraining if needed)."""
        space, kind = key.split("/")
        old_shards = self.files["vectors"][key]
        shards = [self.carry(rel) for rel in old_shards]
        shards += self.writer.write_vectors(space, kind, vectors, first_shard=len(old_shards)) if len(vectors) else []
        self.new_files["vectors"][key] = shards
        source = self.store.vector_source(old_shards)
        full = VectorSource(source.parts + ([np.asarray(vectors, np.float32)] if len(vectors) else []))
        self.new_sources[key] = full
        record = self.manifest["vector_indexes"][key]
        index = self.load(key)
        wanted = choose(self.options(), len(full), full.dim, record["choice"].get("budget_bytes"))
        why = needs_retraining(record, index, vectors, len(full)) if len(vectors) else None
        if wanted.spec.type != spec_of(record).type:
            why = f"at {len(full)} vectors the index type becomes {wanted.spec.type}"
        if why:
            log.warning("%s: rebuilding the vector index from the stored vectors (%s)", key, why)
            index = build_vector_index(full, wanted.spec)
            record["choice"] = {**wanted.to_json(), "reason": f"rebuilt on add: {why}; {wanted.reason}"}
            residual = mean_residual(index, full.sample(10_000, seed=2))
            self.manifest["vector_indexes"][key] = {
                **record,
                "trained": {"count": len(full), "mean_residual": residual},
            }
        elif len(vectors):
            add_vectors(index, vectors)
        self.write_index(key, index)
        self.built[key] = index
        return {key: why} if why else {}

    def remeasure_all(self) -> None:
        for key, index in self.built.items():
            record = self.manifest["vector_indexes"][key]
            self.manifest["vector_indexes"][key] = self.remeasure(key, index, self.query_source(key), record)

    def carry_for_remove(self, compact: Sequence[str]) -> None:
        """Carry every file of kinds not compacted; write the new deleted arrays."""
        self.carry_anchors()
        self.new_files["deleted"] = {}
        for kind in KINDS:
            if kind in compact:
                continue
            self.new_files["items"][kind] = self.carry(self.files["items"][kind])
            if "relative" in self.files:
                self.new_files.setdefault("relative", {})[kind] = self.carry(self.files["relative"][kind])
            if len(self.deleted[kind]):
                self.new_files["deleted"][kind] = self.writer.write_array(
                    "items", f"deleted-{kind}", self.deleted[kind]
                )
        for key in self.manifest["vector_indexes"]:
            if key.split("/")[1] not in compact:
                self.new_files["vectors"][key] = [self.carry(rel) for rel in self.files["vectors"][key]]
                self.new_files["faiss"][key] = self.carry(self.files["faiss"][key])

    def compact(self, kind: str) -> None:
        """Rewrite ``kind`` without its deleted rows: items, vectors, relative rows; refill its indexes (no
        retraining)."""
        live = np.flatnonzero(live_mask(self.rows[kind], self.deleted[kind]))
        table = self.store.read_table(self.files["items"][kind]).take(live)
        self.new_files["items"][kind] = self.writer.write_table(f"{kind}s", table)
        if "relative" in self.files:
            rows = self.old.relative_index(kind).rows[live]
            self.new_files.setdefault("relative", {})[kind] = self.writer.write_sparse(kind, SparseRelativeIndex(rows))
        for key in self.manifest["vector_indexes"]:
            space, key_kind = key.split("/")
            if key_kind != kind:
                continue
            subset = RowSubset(self.source(key), live)
            self.new_files["vectors"][key] = self.writer.write_vectors(space, kind, subset)
            index = empty_copy(self.load(key))
            add_vectors(index, subset)
            self.write_index(key, index)
            self.built[key] = index
            self.new_sources[key] = subset
        self.rows[kind] = len(live)
        self.deleted[kind] = np.zeros(0, np.int64)
