"""The query side: open an index directory and answer text -> image, image -> caption, image -> image and text -> caption.

One :class:`Index` may be queried from many threads at once: its parts load once, on first use (see :mod:`retrieval.api.lazy`).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from retrieval.api.describe import summarise
from retrieval.api.lazy import OnceCache, Serialised
from retrieval.api.routes import (
    QUERIES,
    UNIMODAL,
    caption_hits,
    check_k,
    check_texts,
    choose_route,
    cross_modal_routes,
    image_hits,
    image_id,
    query_name,
    routes_for,
)
from retrieval.asif.anchors import AnchorSet, AnchorSpaces, anchor_texts_of
from retrieval.asif.pooling import relative_of_views
from retrieval.asif.relative import AsifParams, SparseRelativeIndex
from retrieval.core.errors import IndexFormatError, InputError
from retrieval.core.hits import CaptionHit, ImageHit
from retrieval.embed.views import encode_views
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
    """A built index, opened for queries. Encoders load on first use and are checked against the manifest.

    Thread-safe: many threads may query one ``Index`` at once, on every route. Each part (vector
    indexes, stored vectors, relative rows, anchors, items, encoders) loads once, however many
    threads ask for it first; calls into one encoder model run one at a time (its tokenizer and
    lazily built parts are not thread-safe; on a CPU one forward already uses every core), and so
    do searches of an index placed on a GPU. FAISS CPU searches and ASIF searches run in parallel.
    """

    def __init__(self, path: str | Path, device: str = "auto", mmap: bool = True,
                 encoder_snapshots: str | Path | None = None) -> None:
        self.path = Path(path)
        self.device = device
        self.mmap = mmap
        self.encoder_snapshots = encoder_snapshots  # folder of CLIP query snapshots (faster start), or None
        self._parts = OnceCache()  # everything loaded lazily, by key
        self._serial = Serialised()  # encoders and device indexes: one call at a time each
        self._on_device: set[str] = set()  # vector index keys placed off the CPU
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
        """Cross-modal routes this index answers by: ``clip``, or ``asif`` (default) and ``projected``.

        Same-modality queries (image -> image, text -> caption) have their own: see :meth:`routes_for`.
        """
        return cross_modal_routes(self.manifest)

    def routes_for(self, query: str) -> list[str]:
        """The routes of ``query`` (``text_to_image``, ``image_to_caption``, ``image_to_image`` or
        ``text_to_caption``), default first: :attr:`routes` for the cross-modal two; ``clip`` (the shared
        space) or, in an ASIF index, ``unimodal`` (the encoder's own space) for the other two."""
        if query not in QUERIES:
            raise InputError(f"unknown query {query!r}; one of {', '.join(QUERIES)}")
        return routes_for(self.manifest, query)

    def text_to_image(self, text: str, k: int = 10, route: str | None = None, knobs: SearchKnobs | None = None) -> list[ImageHit]:
        """The ``k`` images that best match ``text`` (``route``: see :attr:`routes`; ``knobs``: nprobe / ef_search)."""
        return self.texts_to_images([text], k, route, knobs)[0]

    def texts_to_images(self, texts: Sequence[str], k: int = 10, route: str | None = None,
                        knobs: SearchKnobs | None = None) -> list[list[ImageHit]]:
        """Batch text -> image: all ``texts`` encoded and searched in one pass; one hit list per text."""
        check_texts(texts, k)
        self._require("image")
        route = choose_route(self.path, self.manifest, "text_to_image", route)
        if not texts:
            return []
        scores, positions = self.search_vectors("image", self._encode_texts(texts), "text", k, route, knobs)
        return image_hits(self.items("image"), scores, positions)

    def image_to_caption(self, image: ImageQuery, k: int = 5, route: str | None = None, knobs: SearchKnobs | None = None) -> list[CaptionHit]:
        """The ``k`` captions that best describe ``image`` (a path or a PIL image)."""
        return self.images_to_captions([image], k, route, knobs)[0]

    def images_to_captions(self, images: Sequence[ImageQuery], k: int = 5, route: str | None = None,
                           knobs: SearchKnobs | None = None) -> list[list[CaptionHit]]:
        """Batch image -> caption: all ``images`` (paths or PIL images) encoded and searched in one pass.

        An unreadable image raises :class:`~retrieval.core.errors.ImageDecodeError` naming it; to skip such
        images instead, load them first (see the CLI, which reports and skips them).
        """
        check_k(k)
        self._require("caption")
        route = choose_route(self.path, self.manifest, "image_to_caption", route)
        if not images:
            return []
        if route == "asif" and self.image_views != "none":  # queries pooled over crops, as the indexed images were
            scores, positions = self._search_relative("caption", self._image_view_rows(images), k)
        else:
            scores, positions = self.search_vectors("caption", self._encode_images(images), "image", k, route, knobs)
        return caption_hits(self.items("caption"), scores, positions)

    def image_to_image(self, image: ImageQuery, k: int = 10, exclude_self: bool = False, route: str | None = None,
                       knobs: SearchKnobs | None = None) -> list[ImageHit]:
        """The ``k`` indexed images most like ``image`` (a path or a PIL image): "more like this photo".

        CLIP indexes compare in the shared space, ASIF indexes in the image encoder's own space
        (route ``unimodal``; see :meth:`routes_for`). With ``exclude_self`` an image query that is
        itself in the index (the same resolved path, hence the same id) is left out of its results.
        """
        return self.images_to_images([image], k, exclude_self, route, knobs)[0]

    def images_to_images(self, images: Sequence[ImageQuery], k: int = 10, exclude_self: bool = False,
                         route: str | None = None, knobs: SearchKnobs | None = None,
                         query_ids: Sequence[str | None] | None = None) -> list[list[ImageHit]]:
        """Batch image -> image: all ``images`` encoded and searched in one pass; one hit list per image.

        ``exclude_self`` drops each query's own entry (k + 1 are fetched, so k remain when there are
        enough): found by its path, or given in ``query_ids`` (one id or None per image), which is how
        images already decoded (PIL images, which carry no path) name themselves.
        """
        check_k(k)
        self._require("image")
        route = choose_route(self.path, self.manifest, "image_to_image", route)
        if query_ids is not None and len(query_ids) != len(images):
            raise InputError(f"{len(query_ids)} query ids for {len(images)} images")
        if not images:
            return []
        drop = (list(query_ids) if query_ids is not None else [image_id(image) for image in images]) if exclude_self else None
        queries = self._encode_images(images)
        scores, positions = self.search_vectors("image", queries, "image", k + 1 if exclude_self else k, route, knobs)
        return image_hits(self.items("image"), scores, positions, drop, k)

    def text_to_caption(self, text: str, k: int = 5, route: str | None = None, knobs: SearchKnobs | None = None) -> list[CaptionHit]:
        """The ``k`` indexed captions closest to ``text`` (caption search).

        CLIP indexes compare in the shared space, ASIF indexes in the text encoder's own space
        (route ``unimodal``; see :meth:`routes_for`).
        """
        return self.texts_to_captions([text], k, route, knobs)[0]

    def texts_to_captions(self, texts: Sequence[str], k: int = 5, route: str | None = None,
                          knobs: SearchKnobs | None = None) -> list[list[CaptionHit]]:
        """Batch text -> caption: all ``texts`` encoded and searched in one pass; one hit list per text."""
        check_texts(texts, k)
        self._require("caption")
        route = choose_route(self.path, self.manifest, "text_to_caption", route)
        if not texts:
            return []
        scores, positions = self.search_vectors("caption", self._encode_texts(texts), "text", k, route, knobs)
        return caption_hits(self.items("caption"), scores, positions)

    def search_vectors(
        self, kind: str, queries: np.ndarray, query_modality: str, k: int, route: str | None = None,
        knobs: SearchKnobs | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search the ``kind`` items with encoded queries (rows) of ``query_modality``; returns (scores, positions).

        ``route``: one of :meth:`routes_for` the query (e.g. image vectors searching ``image`` items
        is ``image_to_image``). Deleted items are never returned; a position of -1 pads a row when
        fewer than ``k`` items are live.
        """
        route = choose_route(self.path, self.manifest, query_name(query_modality, kind), route)
        if route in ("clip", UNIMODAL):  # the items' own encoder space, shared with the queries
            return self._search_key(f"{self.manifest['spaces'][kind]}/{kind}", kind, queries, k, knobs)
        if route == "projected":  # items were projected into the query's encoder space at build time
            return self._search_key(f"projected/{kind}", kind, queries, k, knobs)
        relative_queries = self.anchor_spaces.relative(queries, query_modality, self.asif_params)
        return self._search_relative(kind, relative_queries, k)

    def _search_key(self, key: str, kind: str, queries: np.ndarray, k: int, knobs: SearchKnobs | None) -> tuple[np.ndarray, np.ndarray]:
        record = self._records.get(key)
        tuned = knobs_of(record).override(knobs or SearchKnobs())
        rerank_with = self.vector_source(key) if spec_of(record).rerank else None
        index = self.vector_index(key)
        with self._serial.using(index) if key in self._on_device else nullcontext():  # FAISS GPU: one search at a time
            return vector_search(index, queries, k, tuned, self._exclusions(kind), rerank_with)

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

    def _encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        encoder = self.text_encoder
        with self._serial.using(encoder):
            return encoder.encode_texts(list(texts))

    def _encode_images(self, images: Sequence[ImageQuery]) -> np.ndarray:
        """Decode (in parallel with other threads) and encode (one call at a time per encoder)."""
        pictures = [normalize_image(image) if hasattr(image, "convert") else load_image(image).image for image in images]
        encoder = self.image_encoder
        with self._serial.using(encoder):
            return encoder.encode_images(pictures)

    @property
    def image_views(self) -> str:
        """The views each image's ASIF relative row pools (``none``: the whole photo; indexes from before it)."""
        return str(self.manifest.get("image_views", "none"))

    def _image_view_rows(self, images: Sequence[ImageQuery]) -> Any:
        """Relative rows of query images pooled over the index's :attr:`image_views`."""
        pictures = [normalize_image(image) if hasattr(image, "convert") else load_image(image).image for image in images]
        encoder = self.image_encoder
        with self._serial.using(encoder):
            views = encode_views(pictures, encoder, self.image_views)
        return relative_of_views(self.anchor_spaces, views, self.asif_params)

    def items(self, kind: str) -> dict[str, list]:
        """The stored item columns of ``kind`` (``image`` or ``caption``), row-aligned with positions."""
        return self._parts.get(("items", kind), lambda: self.store.read_table(self._files["items"][kind]).to_pydict())

    def _require(self, kind: str) -> None:
        if self.manifest["counts"][kind] == 0:
            raise InputError(f"{self.path}: the index holds no {kind}s; rebuild it with some")

    # -- lazily loaded parts (each once, whichever thread asks first) ------------------------

    @property
    def _records(self) -> dict[str, Any]:
        return self.manifest.get("vector_indexes") or {}

    def vector_index(self, key: str) -> Any:
        """The FAISS index of ``key`` (e.g. ``clip/image``), loaded on first use and placed on the device.

        IVF indexes are memory-mapped (their lists stay on disk) unless ``mmap=False``.
        """
        return self._parts.get(("faiss", key), lambda: self._load_vector_index(key))

    def _load_vector_index(self, key: str) -> Any:
        rel = self._files["faiss"].get(key)
        if rel is None:
            raise IndexFormatError(f"{self.path}: no vector index {key!r}; rebuild the index")
        spec = spec_of(self._records.get(key))
        index = self.store.read_faiss(rel, mmap=self.mmap and spec.nlist is not None)
        placed = place_index(index, spec, self.device, lambda: self.vector_source(key))
        if placed is not index:
            self._on_device.add(key)
        elif spec.rerank:  # build FAISS's re-ranking view of the stored rows now, once, not in a racing search
            self.vector_source(key).native_reranker(placed)
        return placed

    def vector_source(self, key: str) -> VectorSource:
        """The stored float16 vectors of ``key``, memory-mapped (for re-ranking and the torch path)."""
        return self._parts.get(("vectors", key), lambda: self._load_vector_source(key))

    def _load_vector_source(self, key: str) -> VectorSource:
        source = self.store.vector_source(self._files["vectors"][key])
        if spec_of(self._records.get(key)).rerank:  # read a few rows per query: no readahead around them
            source.advise_random_access()
        return source

    def _exclusions(self, kind: str) -> Exclusions | None:
        """The deleted positions of ``kind`` (None when nothing was deleted)."""
        return self._parts.get(("deleted", kind), lambda: self._load_exclusions(kind))

    def _load_exclusions(self, kind: str) -> Exclusions | None:
        rel = (self._files.get("deleted") or {}).get(kind)
        positions = self.store.read_array(rel) if rel else np.zeros(0, np.int64)
        return Exclusions(positions, self.rows(kind)) if len(positions) else None

    def rows(self, kind: str) -> int:
        """Stored rows of ``kind``, deleted ones included (positions run from 0 to rows - 1)."""
        return int((self.manifest.get("rows") or self.manifest["counts"])[kind])

    def deleted(self, kind: str) -> np.ndarray:
        """Positions of the deleted ``kind`` items (their rows stay in :meth:`items` until compaction)."""
        exclude = self._exclusions(kind)
        return exclude.positions if exclude is not None else np.zeros(0, np.int64)

    def relative_index(self, kind: str) -> SparseRelativeIndex:
        """The ASIF relative rows of the ``kind`` items, loaded on first use."""
        return self._parts.get(("relative", kind), lambda: self.store.read_sparse(self._files["relative"][kind], SparseRelativeIndex.load))

    @property
    def anchor_spaces(self) -> AnchorSpaces:
        """The anchor sets of an ASIF index (with their weights), loaded on first use."""
        return self._parts.get("anchors", self._load_anchor_spaces)

    def _load_anchor_spaces(self) -> AnchorSpaces:
        stored = self._files.get("anchors")
        if not stored:
            raise IndexFormatError(f"{self.path}: an ASIF index without anchors; rebuild it")
        sets = [
            AnchorSet(meta["name"], self.store.read_array(files["image"]), self.store.read_array(files["text"]), [],
                      meta["image_encoder"], meta["text_encoder"], texts=anchor_texts_of(meta))
            for meta, files in zip(self.manifest["anchors"], stored)
        ]
        return AnchorSpaces(sets, [meta["weight"] for meta in self.manifest["anchors"]])

    @property
    def asif_params(self) -> AsifParams:
        """The ASIF k and p the collection's relative rows were computed with."""
        return AsifParams.from_json(self.manifest["asif"])

    def _encoders(self) -> tuple[Any, Any]:
        return self._parts.get("encoders", self._load_encoders)

    def encoder_choice(self) -> Any:
        """The :class:`~retrieval.core.config.EncoderChoice` that loads the encoders this index was built with."""
        from retrieval.core.config import EncoderChoice

        records = self.manifest["encoders"]
        checkpoint = self.manifest.get("checkpoint")
        if self.mode == "clip":
            return EncoderChoice(clip=records["image"]["spec"], checkpoint=checkpoint, device=self.device)
        return EncoderChoice(image=records["image"]["spec"], text=records["text"]["spec"], checkpoint=checkpoint, device=self.device)

    def _load_encoders(self) -> tuple[Any, Any]:
        from retrieval.encoders.registry import load_encoders

        records = self.manifest["encoders"]
        image_encoder, text_encoder = load_encoders(self.encoder_choice(), snapshots=self.encoder_snapshots)
        check_same_encoder(records["image"], image_encoder, f"index {self.path}")
        check_same_encoder(records["text"], text_encoder, f"index {self.path}")
        return image_encoder, text_encoder

    @property
    def image_encoder(self) -> Any:
        """The image encoder the index was built with (loaded and checked on first use)."""
        return self._encoders()[0]

    @property
    def text_encoder(self) -> Any:
        """The text encoder the index was built with (the same object as the image encoder for CLIP)."""
        return self._encoders()[1]

    # -- description -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """A summary of the index for people and scripts (``routes``: cross-modal; ``query_routes``: per query)."""
        return summarise(self)

    def errors(self) -> list[dict[str, Any]]:
        """The items skipped at build time, with reasons (rows of ``errors.jsonl``)."""
        return self.store.read_errors()


def open_index(path: str | Path, device: str = "auto", mmap: bool = True,
               encoder_snapshots: str | Path | None = None) -> Index:
    """Open an index directory written by :func:`build_index` (IVF lists memory-mapped unless ``mmap=False``).

    ``encoder_snapshots``: a folder for query snapshots of CLIP encoders; a CPU process then loads a
    CLIP model without importing open_clip (about 2 s sooner), after the first load wrote its snapshot.
    """
    return Index(path, device=device, mmap=mmap, encoder_snapshots=encoder_snapshots)
