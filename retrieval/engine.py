"""The query side: open an index directory and answer text -> image and image -> caption."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .anchors import AnchorSet, AnchorSpaces
from .collection import load_image, normalize_image
from .errors import IndexFormatError, InputError
from .hits import CaptionHit, ImageHit
from .provenance import check_same_encoder
from .relative import AsifParams, SparseRelativeIndex
from .store import StoreReader
from .vector_index import search as vector_search

ImageQuery = Any  # a path (str or Path) or a PIL image


class Index:
    """A built index, opened for queries. Encoders load on first use and are checked against the manifest."""

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        self.path = Path(path)
        self.device = device
        self._store = StoreReader(self.path, kind="index")
        self.manifest: dict[str, Any] = self._store.manifest
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

    def text_to_image(self, text: str, k: int = 10, route: str | None = None) -> list[ImageHit]:
        """The ``k`` images that best match ``text`` (``route``: see :attr:`routes`)."""
        _check_query(text, k)
        self._require("image")
        route = self._route(route)
        query = self.text_encoder.encode_texts([text])
        scores, positions = self._search("image", query, "text", k, route)
        table = self._items["image"]
        return [
            ImageHit(
                rank=rank + 1,
                score=float(score),
                id=table["id"][pos],
                uri=table["uri"][pos],
                width=int(table["width"][pos]),
                height=int(table["height"][pos]),
            )
            for rank, (score, pos) in enumerate(zip(scores, positions))
        ]

    def image_to_caption(self, image: ImageQuery, k: int = 5, route: str | None = None) -> list[CaptionHit]:
        """The ``k`` captions that best describe ``image`` (a path or a PIL image)."""
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        self._require("caption")
        route = self._route(route)
        picture = normalize_image(image) if hasattr(image, "convert") else load_image(image).image
        query = self.image_encoder.encode_images([picture])
        scores, positions = self._search("caption", query, "image", k, route)
        table = self._items["caption"]
        return [
            CaptionHit(
                rank=rank + 1,
                score=float(score),
                id=table["id"][pos],
                caption=table["caption"][pos],
                source=table["source"][pos],
                image_uri=table["image_uri"][pos],
            )
            for rank, (score, pos) in enumerate(zip(scores, positions))
        ]

    def _search(self, kind: str, query: np.ndarray, query_modality: str, k: int, route: str) -> tuple[np.ndarray, np.ndarray]:
        """Search the ``kind`` collection with one encoded query of the other modality."""
        scores, positions = self.search_vectors(kind, query, query_modality, k, route)
        return scores[0], positions[0]

    def search_vectors(
        self, kind: str, queries: np.ndarray, query_modality: str, k: int, route: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search the ``kind`` items with encoded queries (rows) of ``query_modality``; returns (scores, positions)."""
        route = self._route(route)
        if route == "clip":
            return vector_search(self._faiss(kind), queries, k)
        if route == "projected":  # items were projected into the query's encoder space at build time
            return vector_search(self._faiss_indexes[f"projected/{kind}"], queries, k)
        relative_queries = self._anchor_spaces.relative(queries, query_modality, self.asif_params)
        return self._relative(kind).search(relative_queries, k)

    def search_collection(self, source_kind: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Use every stored ``source_kind`` item as a query against the other kind (for evaluation).

        Equivalent to encoding each item again and querying, without running an encoder.
        """
        target = "caption" if source_kind == "image" else "image"
        if self.mode == "clip":
            space = self.manifest["spaces"][source_kind]
            queries = self._store.read_vectors(self._files["vectors"][f"{space}/{source_kind}"])
            return vector_search(self._faiss(target), queries, k)
        return self._relative(target).search(self._relative(source_kind).rows, k)

    def items(self, kind: str) -> dict[str, list]:
        """The stored item columns of ``kind`` (``image`` or ``caption``), row-aligned with positions."""
        return self._items[kind]

    def _require(self, kind: str) -> None:
        if self.manifest["counts"][kind] == 0:
            raise InputError(f"{self.path}: the index holds no {kind}s; rebuild it with some")

    # -- lazily loaded parts ---------------------------------------------------------------

    @cached_property
    def _items(self) -> dict[str, dict[str, list]]:
        return {kind: self._store.read_table(rel).to_pydict() for kind, rel in self._files["items"].items()}

    def _faiss(self, kind: str) -> Any:
        return self._faiss_indexes[kind]

    @cached_property
    def _faiss_indexes(self) -> dict[str, Any]:
        spaces = self.manifest["spaces"]
        indexes = {kind: self._store.read_faiss(self._files["faiss"][f"{spaces[kind]}/{kind}"]) for kind in ("image", "caption")}
        for kind in ("image", "caption"):
            rel = self._files["faiss"].get(f"projected/{kind}")
            if rel:
                indexes[f"projected/{kind}"] = self._store.read_faiss(rel)
        return indexes

    def _relative(self, kind: str) -> SparseRelativeIndex:
        return self._relative_indexes[kind]

    @cached_property
    def _relative_indexes(self) -> dict[str, SparseRelativeIndex]:
        return {kind: SparseRelativeIndex.load(self._store.path(rel)) for kind, rel in self._files["relative"].items()}

    @cached_property
    def _anchor_spaces(self) -> AnchorSpaces:
        stored = self._files.get("anchors")
        if not stored:
            raise IndexFormatError(f"{self.path}: an ASIF index without anchors; rebuild it")
        sets = [
            AnchorSet(meta["name"], self._store.read_array(files["image"]), self._store.read_array(files["text"]), [],
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
        from .build import load_encoders
        from .config import EncoderChoice

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
            "errors": m["errors"],
            "index": m["index"],
            "spaces": m["spaces"],
            "build": m["build"],
            "disk_bytes": self._store.disk_bytes(),
        }
        summary["routes"] = self.routes
        if "anchors" in m:
            summary["anchors"] = [{"name": a["name"], "count": a["count"], "weight": a["weight"]} for a in m["anchors"]]
            summary["asif"] = m["asif"]
        return summary

    def errors(self) -> list[dict[str, Any]]:
        """The items skipped at build time, with reasons (rows of ``errors.jsonl``)."""
        return self._store.read_errors()


def _check_query(text: str, k: int) -> None:
    if not isinstance(text, str) or not text.strip():
        raise InputError("the query text is empty")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")


def open_index(path: str | Path, device: str = "auto") -> Index:
    """Open an index directory written by :func:`build_index`."""
    return Index(path, device=device)
