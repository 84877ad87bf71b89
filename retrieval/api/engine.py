"""The query side: open an index directory and answer text -> image, image -> caption, image -> image and
text -> caption.

One :class:`Index` may be queried from many threads at once: its parts load once, on first use
(see :mod:`retrieval.api.lazy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.api.dedup import DEFAULT_THRESHOLD, DuplicateGroup
from retrieval.api.dedup import duplicates as duplicate_groups
from retrieval.api.describe import summarise
from retrieval.api.filters import FilterCache
from retrieval.api.index_parts import (
    encoder_choice_for,
    load_anchor_spaces,
    load_checked_encoders,
)
from retrieval.api.lazy import OnceCache, Serialised
from retrieval.api.paging import check_paging, page
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
from retrieval.api.shards import ray_options_of
from retrieval.api.vector_parts import VectorParts
from retrieval.asif.anchors import AnchorSpaces
from retrieval.asif.pooling import relative_of_views
from retrieval.asif.relative import AsifParams, SparseRelativeIndex
from retrieval.core.errors import InputError
from retrieval.core.hits import CaptionHit, ImageHit
from retrieval.core.query import Query
from retrieval.embed.views import encode_views
from retrieval.index.selection import Selection, exact_scan, restrict, search_selected
from retrieval.index.spec import SearchKnobs
from retrieval.index.vector_index import drop_excluded
from retrieval.index.vector_index import search as vector_search
from retrieval.index.vector_sets import knobs_of, spec_of
from retrieval.sources.items import load_image, normalize_image
from retrieval.store.reader import StoreReader

ImageQuery = Any  # a path (str or Path) or a PIL image


class Index(VectorParts):
    """A built index, opened for queries. Encoders load on first use and are checked against the manifest.

    Thread-safe: many threads may query one ``Index`` at once, on every route. Each part (vector
    indexes, stored vectors, relative rows, anchors, items, encoders) loads once, however many
    threads ask for it first; calls into one encoder model run one at a time (its tokenizer and
    lazily built parts are not thread-safe; on a CPU one forward already uses every core), and so
    do searches of an index placed on a GPU. FAISS CPU searches and ASIF searches run in parallel.
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        mmap: bool = True,
        encoder_snapshots: str | Path | None = None,
        ray: Any = None,
    ) -> None:
        self.path = Path(path)
        self.device = device
        self.mmap = mmap
        self.ray = ray_options_of(ray)  # index shards searched by Ray actors (None: in this process)
        self.encoder_snapshots = encoder_snapshots  # folder of CLIP query snapshots (faster start), or None
        self._parts = OnceCache()  # everything loaded lazily, by key
        self._serial = Serialised()  # encoders and device indexes: one call at a time each
        self._on_device: set[str] = set()  # vector index keys placed off the CPU
        self.store = StoreReader(self.path, kind="index")
        self.manifest: dict[str, Any] = self.store.manifest
        self._files: dict[str, Any] = self.manifest["files"]
        self.filters = FilterCache(
            lambda kind: self.store.read_table(self._files["items"][kind]),
            lambda kind, allowed: restrict(allowed, self.rows(kind), self._exclusions(kind)),
        )

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

    def text_to_image(
        self,
        text: str,
        k: int = 10,
        route: str | None = None,
        knobs: SearchKnobs | None = None,
        where: str | None = None,
        min_score: float | None = None,
        offset: int = 0,
    ) -> list[ImageHit]:
        """The ``k`` images that best match ``text`` (``route``: see :attr:`routes`; ``knobs``: nprobe / ef_search).

        Every query takes ``where`` (see :meth:`selection`), ``min_score`` and ``offset`` (paging; see api/paging.py).
        """
        return self.texts_to_images([text], k, route, knobs, where, min_score, offset)[0]

    def texts_to_images(
        self,
        texts: Sequence[str],
        k: int = 10,
        route: str | None = None,
        knobs: SearchKnobs | None = None,
        where: str | None = None,
        min_score: float | None = None,
        offset: int = 0,
    ) -> list[list[ImageHit]]:
        """Batch text -> image: all ``texts`` encoded and searched in one pass; one hit list per text."""
        check_texts(texts, k)
        check_paging(offset, min_score)
        self._require("image")
        route = choose_route(self.path, self.manifest, "text_to_image", route)
        if not texts:
            return []
        scores, positions = self.search_vectors(
            "image", self._encode_texts(texts), "text", k + offset, route, knobs, where
        )
        return page(image_hits(self.items("image"), scores, positions), offset, min_score)

    def image_to_caption(
        self,
        image: ImageQuery,
        k: int = 5,
        route: str | None = None,
        knobs: SearchKnobs | None = None,
        where: str | None = None,
        min_score: float | None = None,
        offset: int = 0,
    ) -> list[CaptionHit]:
        """The ``k`` captions that best describe ``image`` (a path or a PIL image)."""
        return self.images_to_captions([image], k, route, knobs, where, min_score, offset)[0]

    def images_to_captions(
        self,
        images: Sequence[ImageQuery],
        k: int = 5,
        route: str | None = None,
        knobs: SearchKnobs | None = None,
        where: str | None = None,
        min_score: float | None = None,
        offset: int = 0,
    ) -> list[list[CaptionHit]]:
        """Batch image -> caption: all ``images`` (paths or PIL images) encoded and searched in one pass.

        An unreadable image raises :class:`~retrieval.core.errors.ImageDecodeError` naming it; to skip such
        images instead, load them first (see the CLI, which reports and skips them).
        """
        check_k(k)
        check_paging(offset, min_score)
        self._require("caption")
        route = choose_route(self.path, self.manifest, "image_to_caption", route)
        if not images:
            return []
        if route == "asif" and self.image_views != "none":  # queries pooled over crops, as the indexed images were
            rows = self._image_view_rows(images)
            scores, positions = self.search_rows("caption", "asif", rows, k + offset, where=where)
        else:
            scores, positions = self.search_vectors(
                "caption", self._encode_images(images), "image", k + offset, route, knobs, where
            )
        return page(caption_hits(self.items("caption"), scores, positions), offset, min_score)

    def image_to_image(
        self,
        image: ImageQuery,
        k: int = 10,
        exclude_self: bool = False,
        route: str | None = None,
        knobs: SearchKnobs | None = None,
        where: str | None = None,
        min_score: float | None = None,
        offset: int = 0,
    ) -> list[ImageHit]:
        """The ``k`` indexed images most like ``image`` (a path or a PIL image): "more like this photo".

        CLIP indexes compare in the shared space, ASIF indexes in the image encoder's own space
        (route ``unimodal``; see :meth:`routes_for`). With ``exclude_self`` an image query that is
        itself in the index (the same resolved path, hence the same id) is left out of its results.
        """
        return self.images_to_images(
            [image], k, exclude_self, route, knobs, where=where, min_score=min_score, offset=offset
        )[0]

    def images_to_images(
        self,
        images: Sequence[ImageQuery],
        k: int = 10,
        exclude_self: bool = False,
        route: str | None = None,
        knobs: SearchKnobs | None = None,
        query_ids: Sequence[str | None] | None = None,
        where: str | None = None,
        min_score: float | None = None,
        offset: int = 0,
    ) -> list[list[ImageHit]]:
        """Batch image -> image: all ``images`` encoded and searched in one pass; one hit list per image.

        ``exclude_self`` drops each query's own entry (k + 1 are fetched, so k remain when there are
        enough): found by its path, or given in ``query_ids`` (one id or None per image), which is how
        images already decoded (PIL images, which carry no path) name themselves.
        """
        check_k(k)
        check_paging(offset, min_score)
        self._require("image")
        route = choose_route(self.path, self.manifest, "image_to_image", route)
        if query_ids is not None and len(query_ids) != len(images):
            raise InputError(f"{len(query_ids)} query ids for {len(images)} images")
        if not images:
            return []
        drop = (
            (list(query_ids) if query_ids is not None else [image_id(image) for image in images])
            if exclude_self
            else None
        )
        queries = self._encode_images(images)
        fetch = k + offset + (1 if exclude_self else 0)
        scores, positions = self.search_vectors("image", queries, "image", fetch, route, knobs, where)
        return page(image_hits(self.items("image"), scores, positions, drop, k + offset), offset, min_score)

    def text_to_caption(
        self,
        text: str,
        k: int = 5,
        route: str | None = None,
        knobs: SearchKnobs | None = None,
        where: str | None = None,
        min_score: float | None = None,
        offset: int = 0,
    ) -> list[CaptionHit]:
        """The ``k`` indexed captions closest to ``text`` (caption search).

        CLIP indexes compare in the shared space, ASIF indexes in the text encoder's own space
        (route ``unimodal``; see :meth:`routes_for`).
        """
        return self.texts_to_captions([text], k, route, knobs, where, min_score, offset)[0]

    def texts_to_captions(
        self,
        texts: Sequence[str],
        k: int = 5,
        route: str | None = None,
        knobs: SearchKnobs | None = None,
        where: str | None = None,
        min_score: float | None = None,
        offset: int = 0,
    ) -> list[list[CaptionHit]]:
        """Batch text -> caption: all ``texts`` encoded and searched in one pass; one hit list per text."""
        check_texts(texts, k)
        check_paging(offset, min_score)
        self._require("caption")
        route = choose_route(self.path, self.manifest, "text_to_caption", route)
        if not texts:
            return []
        scores, positions = self.search_vectors(
            "caption", self._encode_texts(texts), "text", k + offset, route, knobs, where
        )
        return page(caption_hits(self.items("caption"), scores, positions), offset, min_score)

    def search_vectors(
        self,
        kind: str,
        queries: np.ndarray,
        query_modality: str,
        k: int,
        route: str | None = None,
        knobs: SearchKnobs | None = None,
        where: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search the ``kind`` items with encoded queries (rows) of ``query_modality``; returns (scores, positions).

        ``route``: one of :meth:`routes_for` the query (e.g. image vectors searching ``image`` items
        is ``image_to_image``). Deleted items are never returned; a position of -1 pads a row when
        fewer than ``k`` items are live. ``where``: only items it holds for compete (see :meth:`matching`).
        """
        route = choose_route(self.path, self.manifest, query_name(query_modality, kind), route)
        selection = self.selection(kind, where) if where is not None else None
        if route in ("clip", UNIMODAL):  # the items' own encoder space, shared with the queries
            return self._search_key(f"{self.manifest['spaces'][kind]}/{kind}", kind, queries, k, knobs, selection)
        if route == "projected":  # items were projected into the query's encoder space at build time
            return self._search_key(f"projected/{kind}", kind, queries, k, knobs, selection)
        relative_queries = self.anchor_spaces.relative(queries, query_modality, self.asif_params)
        if selection is not None:
            return self.relative_index(kind).search(relative_queries, k, allowed=selection.positions)
        return self._search_relative(kind, relative_queries, k)

    def search(
        self,
        query: Query,
        target: str = "image",
        k: int = 10,
        route: str | None = None,
        knobs: SearchKnobs | None = None,
        dedup: float | None = None,
        exclude: Sequence[str] = (),
        where: str | None = None,
        min_score: float | None = None,
        offset: int = 0,
    ) -> list[ImageHit] | list[CaptionHit]:
        """The ``k`` ``target`` items (``image``/``caption``) best matching a composed
        :class:`~retrieval.core.query.Query`: see :func:`retrieval.api.compose.search_query` (``dedup``: a cosine;
        ``exclude``: ids) and its module docstring;
        ``where``, ``min_score`` and ``offset`` as in :meth:`text_to_image`."""
        from retrieval.api.compose import search_query

        check_paging(offset, min_score)
        hits = search_query(self, query, target, k + offset, route, knobs, dedup, exclude, where=where)
        return page([hits], offset, min_score)[0]

    def search_rows(
        self, kind: str, route: str, rows: Any, k: int, knobs: SearchKnobs | None = None, where: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search the ``kind`` items with query rows already in ``route``'s space (CSR relative rows for ``asif``)."""
        selection = self.selection(kind, where) if where is not None else None
        if route == "asif":
            if selection is not None:
                return self.relative_index(kind).search(rows, k, allowed=selection.positions)
            return self._search_relative(kind, rows, k)
        key = f"projected/{kind}" if route == "projected" else f"{self.manifest['spaces'][kind]}/{kind}"
        return self._search_key(key, kind, rows, k, knobs, selection)

    def duplicates(self, threshold: float | None = None) -> list[DuplicateGroup]:
        """Groups of near-identical live images, each with a suggested keeper: see :mod:`retrieval.api.dedup`."""
        return duplicate_groups(self, DEFAULT_THRESHOLD if threshold is None else threshold)

    def selection(self, kind: str, where: str) -> Selection:
        """The live ``kind`` items for which the SQL predicate ``where`` holds, cached per predicate: over the
        item columns and the source's metadata fields (see :mod:`retrieval.api.filters`); bad ones raise InputError."""
        return self.filters.get(kind, where)

    def matching(self, kind: str, where: str) -> np.ndarray:
        """Positions of the live ``kind`` items for which ``where`` holds, sorted."""
        return self.selection(kind, where).positions

    def _search_key(
        self,
        key: str,
        kind: str,
        queries: np.ndarray,
        k: int,
        knobs: SearchKnobs | None,
        selection: Selection | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        record = self._records.get(key)
        tuned = knobs_of(record).override(knobs or SearchKnobs())
        rerank_with = self.vector_source(key) if spec_of(record).rerank else None
        index = self.vector_index(key)
        if key in self._files.get("faiss_shards", {}):  # fan out to every shard, merge the top k
            if selection is not None:  # the allowed rows' stored vectors, scanned exactly
                return exact_scan(queries, selection.rows(self.vector_source(key)), selection.positions, k)
            return index.search(queries, k, tuned, self._exclusions(kind), rerank_with)
        with self._serial.using(index) if key in self._on_device else nullcontext():  # FAISS GPU: one search at a time
            if selection is not None:
                return search_selected(index, queries, k, tuned, selection, self.vector_source(key), rerank_with)
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
        pictures = [
            normalize_image(image) if hasattr(image, "convert") else load_image(image).image for image in images
        ]
        encoder = self.image_encoder
        with self._serial.using(encoder):
            return encoder.encode_images(pictures)

    def encode(self, modality: str, values: Sequence[Any]) -> np.ndarray:
        """``values`` (texts, or image paths / PIL images) encoded by the index's ``modality`` encoder, one row each."""
        return self._encode_texts(values) if modality == "text" else self._encode_images(values)

    @property
    def image_views(self) -> str:
        """The views each image's ASIF relative row pools (``none``: the whole photo; indexes from before it)."""
        return str(self.manifest.get("image_views", "none"))

    def _image_view_rows(self, images: Sequence[ImageQuery]) -> Any:
        """Relative rows of query images pooled over the index's :attr:`image_views`."""
        pictures = [
            normalize_image(image) if hasattr(image, "convert") else load_image(image).image for image in images
        ]
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

    def relative_index(self, kind: str) -> SparseRelativeIndex:
        """The ASIF relative rows of the ``kind`` items, loaded on first use."""
        return self._parts.get(
            ("relative", kind), lambda: self.store.read_sparse(self._files["relative"][kind], SparseRelativeIndex.load)
        )

    @property
    def anchor_spaces(self) -> AnchorSpaces:
        """The anchor sets of an ASIF index (with their weights), loaded on first use."""
        return self._parts.get("anchors", self._load_anchor_spaces)

    def _load_anchor_spaces(self) -> AnchorSpaces:
        return load_anchor_spaces(self.store, self.manifest, self.path)

    @property
    def asif_params(self) -> AsifParams:
        """The ASIF k and p the collection's relative rows were computed with."""
        return AsifParams.from_json(self.manifest["asif"])

    def _encoders(self) -> tuple[Any, Any]:
        return self._parts.get("encoders", self._load_encoders)

    def encoder_choice(self) -> Any:
        """The :class:`~retrieval.core.config.EncoderChoice` that loads the encoders this index was built with."""
        return encoder_choice_for(self.manifest, self.device)

    def _load_encoders(self) -> tuple[Any, Any]:
        return load_checked_encoders(self.manifest, self.device, self.encoder_snapshots, self.path)

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

    def close(self) -> None:
        """Stop the Ray actors of sharded vector indexes opened with ``ray`` (in-process parts need nothing)."""
        for key in self._files.get("faiss_shards", {}):
            searcher = self._parts.pop(("faiss", key))
            if searcher is not None:
                searcher.close()


def open_index(
    path: str | Path,
    device: str = "auto",
    mmap: bool = True,
    encoder_snapshots: str | Path | None = None,
    ray: Any = None,
) -> Index:
    """Open an index directory written by :func:`build_index` (IVF lists memory-mapped unless ``mmap=False``).

    ``encoder_snapshots``: a folder for query snapshots of CLIP encoders; a CPU process then loads a
    CLIP model without importing open_clip (about 2 s sooner), after the first load wrote its snapshot.
    ``ray`` (``local``, ``auto``, a cluster address or RayOptions): the index shards of a sharded index
    (``--index-shards``) are searched by one Ray actor each; without it, shard by shard in this process.
    """
    return Index(path, device=device, mmap=mmap, encoder_snapshots=encoder_snapshots, ray=ray)
