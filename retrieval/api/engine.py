"""The query side: open an index directory and answer text -> image and image -> caption."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from retrieval.asif.anchors import AnchorSet, AnchorSpaces
from retrieval.asif.relative import AsifParams, SparseRelativeIndex
from retrieval.core.errors import IndexFormatError, InputError
from retrieval.core.hits import CaptionHit, ImageHit
from retrieval.index.placement import place_index
from retrieval.index.source import VectorSource
from retrieval.index.spec import SearchKnobs
from retrieval.index.vector_index import Exclusions, drop_excluded
from retrieval.index.vector_index import search as vector_search
from retrieval.index.vector_sets import knobs_of, spec_of
from retrieval.sources.items import load_image, normalize_image
from retrieval.store.provenance import check_same_encoder
from retrieval.store.reader import StoreReader

ImageQuery = Any  # a path (str or Path) or a PIL image


class Index:
    """A built index, opened for queries. Encoders load on first use and are checked against the manifest."""

    def __init__(self, path: str | Path, device: str = "auto", mmap: bool = True) -> None:
        self.path = Path(path)
        self.device = device
        self.mmap = mmap
        self._loaded: dict[str, Any] = {}
        self._sources: dict[str, VectorSource] = {}
        self._excluded: dict[str, Exclusions | None] = {}
        self.store = StoreReader(self.path, kind="index")
        self.manifest: dict[str, Any] = self.store.manifest
        self._files: dict[str, Any] = self.manifest["files"]

    def __repr__(self) -> str:
        counts = self.manifest["counts"]
        return f"Index({str(self.path)!r}, mode={self.mode}, images={counts['image']}, captions={counts['caption']})"

    @property
    def mode(self) -> str:
        """``clip`` (one contrastive space) or ``asif`` (unimodal encoders + anchors)."""
        return self.manifest["mode"]

    # -- queries ---------------------------------------------------------------------------

    @property
    def routes(self) -> list[str]:
        """Cross-modal routes this index answers by: ``clip``, or ``asif`` (default) and ``projected``."""
        return self.manifest.get("routes") or (["clip"] if self.mode == "clip" else ["asif"])

    def _route(self, route: str | None) -> str:
        if route is None:
            return self.routes[0]
        if route not in self.routes:
            raise InputError(f"{self.path}: route {route!r} not available; this index answers by {', '.join(self.routes)}")
        return route

    def text_to_image(self, text: str, k: int = 10, route: str | None = None, knobs: SearchKnobs | None = None) -> list[ImageHit]:
        """The ``k`` images that best match ``text`` (``route``: see :attr:`routes`; ``knobs``: nprobe / ef_search)."""
        return self.texts_to_images([text], k, route, knobs)[0]

    def texts_to_images(self, texts: Sequence[str], k: int = 10, route: str | None = None,
                        knobs: SearchKnobs | None = None) -> list[list[ImageHit]]:
        """Batch text -> image: all ``texts`` encoded and searched in one pass; one hit list per text."""
        for text in texts:
            _check_query(text, k)
        self._require("image")
        route = self._route(route)
        if not texts:
            return []
        queries = self.text_encoder.encode_texts(list(texts))
        scores, positions = self.search_vectors("image", queries, "text", k, route, knobs)
        table = self._items["image"]
        return [
            [
                ImageHit(rank=rank + 1, score=float(score), id=table["id"][pos], uri=table["uri"][pos],
                         width=int(table["width"][pos]), height=int(table["height"][pos]))
                for rank, (score, pos) in enumerate(_live(row_scores, row_positions))
            ]
            for row_scores, row_positions in zip(scores, positions)
        ]

    def image_to_caption(self, image: ImageQuery, k: int = 5, route: str | None = None, knobs: SearchKnobs | None = None) -> list[CaptionHit]:
        """The ``k`` captions that best describe ``image`` (a path or a PIL image)."""
        return self.images_to_captions([image], k, route, knobs)[0]

    def images_to_captions(self, images: Sequence[ImageQuery], k: int = 5, route: str | None = None,
                           knobs: SearchKnobs | None = None) -> list[list[CaptionHit]]:
        """Batch image -> caption: all ``images`` (paths or PIL images) encoded and searched in one pass.

        An unreadable image raises :class:`~retrieval.core.errors.ImageDecodeError` naming it; to skip such
        images instead, load them first (see the CLI, which reports and skips them).
        """
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        self._require("caption")
        route = self._route(route)
        if not images:
            return []
        pictures = [normalize_image(image) if hasattr(image, "convert") else load_image(image).image for image in images]
        queries = self.image_encoder.encode_images(pictures)
        scores, positions = self.search_vectors("caption", queries, "image", k, route, knobs)
        table = self._items["caption"]
        return [
            [
                CaptionHit(rank=rank + 1, score=float(score), id=table["id"][pos], caption=table["caption"][pos],
                           source=table["source"][pos], image_uri=table["image_uri"][pos])
                for rank, (score, pos) in enumerate(_live(row_scores, row_positions))
            ]
            for row_scores, row_positions in zip(scores, positions)
        ]

    def search_vectors(
        self, kind: str, queries: np.ndarray, query_modality: str, k: int, route: str | None = None,
        knobs: SearchKnobs | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search the ``kind`` items with encoded queries (rows) of ``query_modality``; returns (scores, positions).

        Deleted items are never returned; a position of -1 pads a row when fewer than ``k`` items are live.
        """
        route = self._route(route)
        if route == "clip":
            return self._search_key(f"{self.manifest['spaces'][kind]}/{kind}", kind, queries, k, knobs)
        if route == "projected":  # items were projected into the query's encoder space at build time
            return self._search_key(f"projected/{kind}", kind, queries, k, knobs)
        relative_queries = self.anchor_spaces.relative(queries, query_modality, self.asif_params)
        return self._search_relative(kind, relative_queries, k)

    def _search_key(self, key: str, kind: str, queries: np.ndarray, k: int, knobs: SearchKnobs | None) -> tuple[np.ndarray, np.ndarray]:
        record = self._records.get(key)
        tuned = knobs_of(record).override(knobs or SearchKnobs())
        rerank_with = self.vector_source(key) if spec_of(record).rerank else None
        return vector_search(self.vector_index(key), queries, k, tuned, self._exclusions(kind), rerank_with)

    def _search_relative(self, kind: str, relative_queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        exclude = self._exclusions(kind)
        index = self.relative_index(kind)
        if exclude is None:
            return index.search(relative_queries, k)
        fetch = min(len(index), k + len(exclude))
        scores, positions = index.search(relative_queries, fetch)
        return drop_excluded(scores, positions, exclude, min(k, len(index) - len(exclude)))

    def search_collection(self, source_kind: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Use every stored ``source_kind`` item as a query against the other kind (for evaluation).

        Equivalent to encoding each item again and querying, without running an encoder.
        """
        target = "caption" if source_kind == "image" else "image"
        if self.mode == "clip":
            space = self.manifest["spaces"][source_kind]
            queries = self.store.read_vectors(self._files["vectors"][f"{space}/{source_kind}"])
            return self._search_key(f"{space}/{target}", target, queries, k, None)
        return self._search_relative(target, self.relative_index(source_kind).rows, k)

    def items(self, kind: str) -> dict[str, list]:
        """The stored item columns of ``kind`` (``image`` or ``caption``), row-aligned with positions."""
        return self._items[kind]

    def _require(self, kind: str) -> None:
        if self.manifest["counts"][kind] == 0:
            raise InputError(f"{self.path}: the index holds no {kind}s; rebuild it with some")

    # -- lazily loaded parts ---------------------------------------------------------------

    @cached_property
    def _items(self) -> dict[str, dict[str, list]]:
        return {kind: self.store.read_table(rel).to_pydict() for kind, rel in self._files["items"].items()}

    @property
    def _records(self) -> dict[str, Any]:
        return self.manifest.get("vector_indexes") or {}

    def _faiss(self, kind: str) -> Any:
        """The FAISS index of ``kind`` in its own encoder's space."""
        return self.vector_index(f"{self.manifest['spaces'][kind]}/{kind}")

    def vector_index(self, key: str) -> Any:
        """The FAISS index of ``key`` (e.g. ``clip/image``), loaded on first use and placed on the device.

        IVF indexes are memory-mapped (their lists stay on disk) unless ``mmap=False``.
        """
        if key not in self._loaded:
            rel = self._files["faiss"].get(key)
            if rel is None:
                raise IndexFormatError(f"{self.path}: no vector index {key!r}; rebuild the index")
            spec = spec_of(self._records.get(key))
            index = self.store.read_faiss(rel, mmap=self.mmap and spec.nlist is not None)
            self._loaded[key] = place_index(index, spec, self.device, lambda: self.vector_source(key))
        return self._loaded[key]

    def vector_source(self, key: str) -> VectorSource:
        """The stored float16 vectors of ``key``, memory-mapped (for re-ranking and the torch path)."""
        if key not in self._sources:
            source = self.store.vector_source(self._files["vectors"][key])
            if spec_of(self._records.get(key)).rerank:  # read a few rows per query: no readahead around them
                source.advise_random_access()
            self._sources[key] = source
        return self._sources[key]

    def _exclusions(self, kind: str) -> Exclusions | None:
        """The deleted positions of ``kind`` (None when nothing was deleted)."""
        if kind not in self._excluded:
            rel = (self._files.get("deleted") or {}).get(kind)
            positions = self.store.read_array(rel) if rel else np.zeros(0, np.int64)
            self._excluded[kind] = Exclusions(positions, self.rows(kind)) if len(positions) else None
        return self._excluded[kind]

    def rows(self, kind: str) -> int:
        """Stored rows of ``kind``, deleted ones included (positions run from 0 to rows - 1)."""
        return int((self.manifest.get("rows") or self.manifest["counts"])[kind])

    def deleted(self, kind: str) -> np.ndarray:
        """Positions of the deleted ``kind`` items (their rows stay in :meth:`items` until compaction)."""
        exclude = self._exclusions(kind)
        return exclude.positions if exclude is not None else np.zeros(0, np.int64)

    def relative_index(self, kind: str) -> SparseRelativeIndex:
        return self._relative_indexes[kind]

    @cached_property
    def _relative_indexes(self) -> dict[str, SparseRelativeIndex]:
        return {kind: SparseRelativeIndex.load(self.store.path(rel)) for kind, rel in self._files["relative"].items()}

    @cached_property
    def anchor_spaces(self) -> AnchorSpaces:
        stored = self._files.get("anchors")
        if not stored:
            raise IndexFormatError(f"{self.path}: an ASIF index without anchors; rebuild it")
        sets = [
            AnchorSet(meta["name"], self.store.read_array(files["image"]), self.store.read_array(files["text"]), [],
                      meta["image_encoder"], meta["text_encoder"])
            for meta, files in zip(self.manifest["anchors"], stored)
        ]
        return AnchorSpaces(sets, [meta["weight"] for meta in self.manifest["anchors"]])

    @property
    def asif_params(self) -> AsifParams:
        """The ASIF k and p the collection's relative rows were computed with."""
        return AsifParams.from_json(self.manifest["asif"])

    @cached_property
    def _encoders(self) -> tuple[Any, Any]:
        from retrieval.core.config import EncoderChoice
        from retrieval.encoders.registry import load_encoders

        records = self.manifest["encoders"]
        checkpoint = self.manifest.get("checkpoint")
        if self.mode == "clip":
            choice = EncoderChoice(clip=records["image"]["spec"], checkpoint=checkpoint, device=self.device)
        else:
            choice = EncoderChoice(image=records["image"]["spec"], text=records["text"]["spec"], checkpoint=checkpoint, device=self.device)
        image_encoder, text_encoder = load_encoders(choice)
        check_same_encoder(records["image"], image_encoder, f"index {self.path}")
        check_same_encoder(records["text"], text_encoder, f"index {self.path}")
        return image_encoder, text_encoder

    @property
    def image_encoder(self) -> Any:
        return self._encoders[0]

    @property
    def text_encoder(self) -> Any:
        return self._encoders[1]

    # -- description -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """A summary of the index for people and scripts."""
        m = self.manifest
        summary = {
            "path": str(self.path),
            "format": m["format"],
            "tool_version": m["tool"]["version"],
            "created": m["created"],
            "build_id": m["build_id"],
            "mode": m["mode"],
            "encoders": m["encoders"],
            "checkpoint": m.get("checkpoint"),
            "counts": m["counts"],
            "deleted": {kind: int(len(self.deleted(kind))) for kind in ("image", "caption")},
            "errors": m["errors"],
            "index": m["index"],
            "vector_indexes": _describe_vector_indexes(m),
            "spaces": m["spaces"],
            "build": m["build"],
            "disk_bytes": self.store.disk_bytes(),
        }
        summary["routes"] = self.routes
        if "anchors" in m:
            summary["anchors"] = [{"name": a["name"], "count": a["count"], "weight": a["weight"]} for a in m["anchors"]]
            summary["asif"] = m["asif"]
        return summary

    def errors(self) -> list[dict[str, Any]]:
        """The items skipped at build time, with reasons (rows of ``errors.jsonl``)."""
        return self.store.read_errors()


def _describe_vector_indexes(manifest: dict[str, Any]) -> dict[str, Any]:
    """Per vector index: what was built and why, and the recall and latency measured on this collection."""
    described = {}
    for key, record in (manifest.get("vector_indexes") or {}).items():
        choice, measured = record["choice"], record.get("measured") or {}
        described[key] = {
            "type": choice["spec"]["type"],
            "factory": choice["spec"]["factory"],
            "count": record["count"],
            "why": choice["reason"],
            "estimated_bytes": choice["estimated_bytes"],
            "knobs": measured.get("knobs", {}),
            "recall@1": measured.get("recall@1"),
            "recall@10": measured.get("recall@10"),
            "latency_ms_median": measured.get("latency_ms_median"),
            "recall_queries": measured.get("queries"),
            "query_source": measured.get("query_source"),
            "target_reached": measured.get("target_reached"),
        }
    return described


def _live(scores: np.ndarray, positions: np.ndarray) -> list[tuple[float, int]]:
    """(score, position) pairs of one result row, padding (-1) dropped."""
    return [(float(score), int(pos)) for score, pos in zip(scores, positions) if pos >= 0]


def _check_query(text: str, k: int) -> None:
    if not isinstance(text, str) or not text.strip():
        raise InputError("the query text is empty")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")


def open_index(path: str | Path, device: str = "auto", mmap: bool = True) -> Index:
    """Open an index directory written by :func:`build_index` (IVF lists memory-mapped unless ``mmap=False``)."""
    return Index(path, device=device, mmap=mmap)
