"""The query side: open an index directory and answer text -> image, image -> caption, image -> image and
text -> caption, and composed queries.

Every query method takes ``k`` and one :class:`~retrieval.core.search.SearchOptions` (route, knobs, where,
min_score, offset, dedup); each search goes through one route dispatch (:meth:`Index.search_rows`) and
one narrowing of its results (:func:`retrieval.api.paging.narrowed`).

One :class:`Index` may be queried from many threads at once: its parts load once, on first use
(see :mod:`retrieval.api.lazy`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.api.dedup import DEFAULT_THRESHOLD, DuplicateGroup
from retrieval.api.dedup import duplicates as duplicate_groups
from retrieval.api.describe import summarise
from retrieval.api.filters import FilterCache
from retrieval.api.lazy import OnceCache, Serialised
from retrieval.api.paging import narrowed
from retrieval.api.query_parts import ImageQuery, QueryParts
from retrieval.api.routes import (
    QUERIES,
    check_texts,
    choose_route,
    cross_modal_routes,
    hits_of,
    image_id,
    query_name,
    routes_for,
)
from retrieval.api.shards import ray_options_of
from retrieval.core.errors import InputError
from retrieval.core.hits import CaptionHit, ImageHit
from retrieval.core.query import Query
from retrieval.core.search import SearchKnobs, SearchOptions, check_k, options_or_default
from retrieval.index.selection import Selection, exact_scan, restrict, search_selected
from retrieval.index.vector_index import drop_excluded
from retrieval.index.vector_index import search as vector_search
from retrieval.index.vector_sets import knobs_of, spec_of
from retrieval.store.reader import StoreReader


class Index(QueryParts):
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
        return str(self.manifest["mode"])

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

    def text_to_image(self, text: str, k: int = 10, options: SearchOptions | None = None) -> list[ImageHit]:
        """The ``k`` images that best match ``text``.

        Every query method takes ``options`` (:class:`~retrieval.core.search.SearchOptions`: ``route``, see
        :meth:`routes_for`; ``knobs``: nprobe / ef_search; ``where``, see :meth:`selection`; ``min_score``,
        ``offset`` and ``dedup``, see :mod:`retrieval.api.paging`); None: the defaults.
        """
        return self.texts_to_images([text], k, options)[0]

    def texts_to_images(
        self, texts: Sequence[str], k: int = 10, options: SearchOptions | None = None
    ) -> list[list[ImageHit]]:
        """Batch text -> image: all ``texts`` encoded and searched in one pass; one hit list per text."""
        return self._answer("text_to_image", texts, k, options)

    def image_to_caption(self, image: ImageQuery, k: int = 5, options: SearchOptions | None = None) -> list[CaptionHit]:
        """The ``k`` captions that best describe ``image`` (a path or a PIL image)."""
        return self.images_to_captions([image], k, options)[0]

    def images_to_captions(
        self, images: Sequence[ImageQuery], k: int = 5, options: SearchOptions | None = None
    ) -> list[list[CaptionHit]]:
        """Batch image -> caption: all ``images`` (paths or PIL images) encoded and searched in one pass.

        An unreadable image raises :class:`~retrieval.core.errors.ImageDecodeError` naming it; to skip such
        images instead, load them first (see the CLI, which reports and skips them).
        """
        return self._answer("image_to_caption", images, k, options)

    def image_to_image(
        self, image: ImageQuery, k: int = 10, options: SearchOptions | None = None, *, exclude_self: bool = False
    ) -> list[ImageHit]:
        """The ``k`` indexed images most like ``image`` (a path or a PIL image): "more like this photo".

        CLIP indexes compare in the shared space, ASIF indexes in the image encoder's own space
        (route ``unimodal``; see :meth:`routes_for`). With ``exclude_self`` an image query that is
        itself in the index (the same resolved path, hence the same id) is left out of its results.
        """
        return self.images_to_images([image], k, options, exclude_self=exclude_self)[0]

    def images_to_images(
        self,
        images: Sequence[ImageQuery],
        k: int = 10,
        options: SearchOptions | None = None,
        *,
        exclude_self: bool = False,
        query_ids: Sequence[str | None] | None = None,
    ) -> list[list[ImageHit]]:
        """Batch image -> image: all ``images`` encoded and searched in one pass; one hit list per image.

        ``exclude_self`` drops each query's own entry (more are fetched, so k remain when there are
        enough): found by its path, or given in ``query_ids`` (one id or None per image), which is how
        images already decoded (PIL images, which carry no path) name themselves.
        """
        if query_ids is not None and len(query_ids) != len(images):
            raise InputError(f"{len(query_ids)} query ids for {len(images)} images")
        drop = None
        if exclude_self:
            own = list(query_ids) if query_ids is not None else [image_id(image) for image in images]
            drop = [{i} if i is not None else set() for i in own]
        return self._answer("image_to_image", images, k, options, drop)

    def text_to_caption(self, text: str, k: int = 5, options: SearchOptions | None = None) -> list[CaptionHit]:
        """The ``k`` indexed captions closest to ``text`` (caption search).

        CLIP indexes compare in the shared space, ASIF indexes in the text encoder's own space
        (route ``unimodal``; see :meth:`routes_for`).
        """
        return self.texts_to_captions([text], k, options)[0]

    def texts_to_captions(
        self, texts: Sequence[str], k: int = 5, options: SearchOptions | None = None
    ) -> list[list[CaptionHit]]:
        """Batch text -> caption: all ``texts`` encoded and searched in one pass; one hit list per text."""
        return self._answer("text_to_caption", texts, k, options)

    def search(
        self,
        query: Query,
        target: str = "image",
        k: int = 10,
        options: SearchOptions | None = None,
        *,
        exclude: Collection[str] = (),
    ) -> list[ImageHit] | list[CaptionHit]:
        """The ``k`` ``target`` items (``image``/``caption``) best matching a composed
        :class:`~retrieval.core.query.Query`: see :func:`retrieval.api.compose.search_query` and its module
        docstring (``exclude``: item ids left out; ``options`` as in :meth:`text_to_image`)."""
        from retrieval.api.compose import search_query

        return search_query(self, query, target, k, options, exclude)

    def search_vectors(
        self,
        kind: str,
        queries: np.ndarray,
        query_modality: str,
        k: int,
        options: SearchOptions | None = None,
        *,
        exclude: Collection[str] = (),
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search the ``kind`` items with encoded queries (rows) of ``query_modality``; returns (scores, positions),
        ranked and narrowed by ``options`` as the hits of the other query methods are.

        ``options.route``: one of :meth:`routes_for` the query (e.g. image vectors searching ``image`` items
        is ``image_to_image``). Deleted items and ``exclude`` (ids) are never returned; a position of -1
        pads a row holding fewer than ``k`` hits.
        """
        k, options = check_k(k), options_or_default(options)
        route = choose_route(self.path, self.manifest, query_name(query_modality, kind), options.route)
        rows = self.anchor_spaces.relative(queries, query_modality, self.asif_params) if route == "asif" else queries
        return self.search_rows(kind, rows, k, options.replace(route=route), exclude=exclude)

    def search_rows(
        self, kind: str, rows: Any, k: int, options: SearchOptions, *, exclude: Collection[str] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search the ``kind`` items with query rows already in the space of ``options.route`` (which must be
        given: CSR relative rows for ``asif``, encoder vectors otherwise); as :meth:`search_vectors` returns."""
        k = check_k(k)
        if options.route is None:
            raise InputError("search_rows needs options.route: the space its rows are in")
        return self._narrowed(kind, rows, k, options, [exclude] * rows.shape[0])

    def _answer(
        self,
        query: str,
        values: Sequence[Any],
        k: int,
        options: SearchOptions | None,
        drop: Sequence[Collection[str]] | None = None,
    ) -> list[list[Any]]:
        """One hit list per query value (texts or images) of ``query`` (a key of :data:`QUERIES`)."""
        modality, kind = QUERIES[query]
        if modality == "text":
            check_texts(values)
        k, options = check_k(k), options_or_default(options)
        self._require(kind)
        route = choose_route(self.path, self.manifest, query, options.route)
        if not values:
            return []
        rows = self.in_route_space(modality, values, route)
        scores, positions = self._narrowed(kind, rows, k, options.replace(route=route), drop or [()] * len(values))
        hits: list[list[Any]] = hits_of(kind)(self.items(kind), scores, positions, options.offset + 1)
        return hits

    def _narrowed(
        self, kind: str, rows: Any, k: int, options: SearchOptions, drop: Sequence[Collection[str]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """``rows`` (in ``options.route``'s space) searched in the ``kind`` items, as often as narrowing needs."""
        route, selection = str(options.route), self.selection(kind, options.where) if options.where else None
        return narrowed(
            self,
            kind,
            lambda fetch: self._search_space(kind, route, rows, fetch, options.knobs, selection),
            k,
            options,
            drop,
        )

    def _search_space(
        self, kind: str, route: str, rows: Any, k: int, knobs: SearchKnobs, selection: Selection | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The one route dispatch: relative rows for ``asif``, else the vector index of the route's space."""
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
        selection: Selection = self.filters.get(kind, where)
        return selection

    def matching(self, kind: str, where: str) -> np.ndarray:
        """Positions of the live ``kind`` items for which ``where`` holds, sorted."""
        return self.selection(kind, where).positions

    def _search_key(
        self, key: str, kind: str, queries: np.ndarray, k: int, knobs: SearchKnobs, selection: Selection | None
    ) -> tuple[np.ndarray, np.ndarray]:
        record = self._records.get(key)
        tuned = knobs_of(record).override(knobs)
        rerank_with = self.vector_source(key) if spec_of(record).rerank else None
        index = self.vector_index(key)
        found: tuple[np.ndarray, np.ndarray]
        if key in self._files.get("faiss_shards", {}):  # fan out to every shard, merge the top k
            if selection is not None:  # the allowed rows' stored vectors, scanned exactly
                return exact_scan(queries, selection.rows(self.vector_source(key)), selection.positions, k)
            found = index.search(queries, k, tuned, self._exclusions(kind), rerank_with)
            return found
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
            return self._search_space(target, "clip", queries, k, SearchKnobs(), None)
        return self._search_space(target, "asif", self.relative_index(source_kind).rows, k, SearchKnobs(), None)

    def _require(self, kind: str) -> None:
        if self.manifest["counts"][kind] == 0:
            raise InputError(f"{self.path}: the index holds no {kind}s; rebuild it with some")

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
