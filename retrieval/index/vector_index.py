"""FAISS vector indexes: build from a spec, search with per-query knobs, deletions and re-ranking.

Positions returned by :func:`search` are row numbers of the vectors added, in
order (FAISS sequential ids). Deleted rows are excluded at search time with a
FAISS ID selector, so every index type (flat, IVF, HNSW) supports deletion
without a rebuild.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from retrieval.core.errors import InputError
from retrieval.core.search import SearchKnobs
from retrieval.index.source import ADD_CHUNK, VectorSource, as_source
from retrieval.index.spec import (
    DEFAULT_RERANK_FACTOR,
    HNSW_EF_CONSTRUCTION,
    IndexSpec,
    spec_for,
)

log = logging.getLogger(__name__)


HNSW_ADD_CHUNK = 1 << 24


REFINE_FOURCC = b"IxRF"  # how a FAISS IndexRefine file starts


def build_vector_index(
    vectors: VectorSource | np.ndarray, spec: IndexSpec | str = "flat", progress: bool = False, seed: int = 0
) -> Any:
    """Build an inner-product FAISS index over L2-normalised rows: train on a sample, add in chunks."""
    source = as_source(vectors)
    index = train_vector_index(source, spec, seed)
    add_vectors(index, source, progress=progress)
    return index


def train_vector_index(vectors: VectorSource | np.ndarray, spec: IndexSpec | str = "flat", seed: int = 0) -> Any:
    """The empty FAISS index of ``spec``, trained (lists, codebooks) on a sample of ``vectors`` when it needs training.

    The sample depends only on the vectors, the spec and ``seed``: a distributed build trains the same index.
    """
    import faiss

    source = as_source(vectors)
    if isinstance(spec, str):
        spec = spec_for(spec, len(source), source.dim)
    d = source.dim or 1
    index = faiss.index_factory(d, spec.factory, faiss.METRIC_INNER_PRODUCT)
    apply_build_params(index, spec)
    if not index.is_trained:
        if len(source) < (spec.nlist or 1):
            raise InputError(
                f"{spec.factory} needs at least {spec.nlist} vectors to train, got {len(source)}; use flat"
            )
        sample = source.sample(spec.train_size or len(source), seed=seed)
        log.info("training %s on %d of %d vectors", spec.factory, len(sample), len(source))
        index.train(sample)
    return index


def apply_build_params(index: Any, spec: IndexSpec) -> None:
    """The build settings this package uses (k-means iterations, no polysemous training, efConstruction, OPQ
    iterations)."""
    import faiss

    index = without_refinement(index)
    ivf = _ivf_of(index)
    if ivf is not None:
        ivf.cp.niter = 10  # the lists need not be optimal, only balanced: 10 iterations, like autofaiss
        ivf.cp.min_points_per_centroid = 1
        ivfpq: Any = faiss.downcast_index(ivf)
        if isinstance(ivfpq, faiss.IndexIVFScalarQuantizer) and ivfpq.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
            ivfpq.by_residual = False  # lists hold the float16 vectors themselves: exactly what the store keeps
        if hasattr(ivfpq, "pq"):
            ivfpq.do_polysemous_training = (
                False  # FAISS's default trains it: minutes, and we never use Hamming filtering
            )
            ivfpq.pq.cp.niter = 10
        quantizer = faiss.downcast_index(ivf.quantizer)
        if hasattr(quantizer, "hnsw"):
            quantizer.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            quantizer.hnsw.efSearch = 128
    for transform in pre_transforms(index):
        if isinstance(transform, faiss.OPQMatrix):
            transform.niter = 10
    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    if hasattr(base, "hnsw"):
        base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION


def add_vectors(index: Any, vectors: VectorSource | np.ndarray, progress: bool = False) -> None:
    """Append rows to ``index`` in chunks (their positions continue from ``index.ntotal``).

    An HNSW graph gets one large batch: FAISS builds a markedly worse graph from many small
    ones (benchmarks/ANN.md), and it holds every vector in memory anyway.
    """
    source = as_source(vectors)
    chunk_rows = HNSW_ADD_CHUNK if _is_hnsw(index) else ADD_CHUNK
    bar = None
    if progress and len(source) > chunk_rows:
        from tqdm import tqdm

        bar = tqdm(total=len(source), desc="indexing", unit="vec", unit_scale=True, leave=False)
    for chunk in source.chunks(chunk_rows):
        index.add(chunk)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()


def _is_hnsw(index: Any) -> bool:
    return hasattr(_core(index), "hnsw")


def without_refinement(index: Any) -> Any:
    """The index under a FAISS ``IndexRefine`` (itself when not refined)."""
    import faiss

    refine = faiss.downcast_index(index) if isinstance(index, faiss.Index) else index
    return faiss.downcast_index(refine.base_index) if isinstance(refine, faiss.IndexRefine) else index


def _core(index: Any) -> Any:
    """The index under any re-ranking and transform wrappers (where HNSW or IVF settings live)."""
    import faiss

    base = without_refinement(index)
    return faiss.downcast_index(base.index) if isinstance(base, faiss.IndexPreTransform) else faiss.downcast_index(base)


def is_refined(index: Any) -> bool:
    """Whether ``index`` re-ranks its own shortlist (a FAISS ``IndexRefine``: ivfpq with its rows, or a factory
    ``...,Refine(...)``)."""
    import faiss

    return isinstance(index, faiss.Index) and isinstance(faiss.downcast_index(index), faiss.IndexRefine)


def _ivf_of(index: Any) -> Any:
    import faiss

    if hasattr(faiss, "try_extract_index_ivf"):  # no exception on the search path for non-IVF indexes
        return faiss.try_extract_index_ivf(index)
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def is_ivf(index: Any) -> bool:
    return _ivf_of(index) is not None


def empty_copy(index: Any) -> Any:
    """A trained copy of ``index`` holding no vectors (for refilling without retraining)."""
    import faiss

    copy = faiss.clone_index(index)
    copy.reset()
    return copy


def pre_transforms(index: Any) -> list[Any]:
    """The vector transforms (e.g. OPQ) an ``IndexPreTransform`` applies before its index, in order; [] for others."""
    import faiss

    if not isinstance(index, faiss.IndexPreTransform):
        return []
    chain: Any = index.chain  # a SWIG vector (size, at), not the list faiss's stubs declare
    return [faiss.downcast_VectorTransform(chain.at(number)) for number in range(chain.size())]


def search_params(index: Any, knobs: SearchKnobs, selector: Any = None) -> Any:
    """FAISS per-query search parameters for ``index`` (None when there is nothing to set)."""
    import faiss

    ivf = _ivf_of(index)
    base = _core(index)
    params: Any
    if ivf is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = int(knobs.nprobe or ivf.nprobe)
    elif hasattr(base, "hnsw"):
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from faiss's stubs
        params.efSearch = int(knobs.ef_search or base.hnsw.efSearch)
    elif selector is not None:
        params = faiss.SearchParameters()
    else:
        params = None
    if selector is not None:
        params.sel = selector
    if is_refined(index):  # FAISS re-ranks a shortlist of k x k_factor from its float16 codes
        refine: Any = faiss.IndexRefineSearchParameters()
        refine.k_factor = float(knobs.rerank_factor or DEFAULT_RERANK_FACTOR)
        if params is not None:
            refine.base_index_params = params
            refine.referenced_params = params  # keep the base parameters alive as long as these
        params = refine
    return params


def own_knobs(index: Any) -> SearchKnobs:
    """The IVF probes / HNSW breadth ``index`` searches with when no knob overrides them (None where it has none)."""
    ivf, base = _ivf_of(index), _core(index)
    return SearchKnobs(
        nprobe=int(ivf.nprobe) if ivf is not None else None,
        ef_search=int(base.hnsw.efSearch) if hasattr(base, "hnsw") else None,
    )


PARAMS_CACHE_SIZE = 64


def _cached_search_params(index: Any, knobs: SearchKnobs, selector: Any) -> Any:
    """:func:`search_params`, built once per (knobs, selector) and kept on the index object.

    Building them costs several microseconds of SWIG calls, a noticeable share of
    a 50-200 us single-query search. The cached entry holds the selector, so its
    id cannot be reused while the entry lives.
    """
    if (
        knobs.nprobe is None and knobs.ef_search is None and knobs.rerank_factor is None
    ):  # the index's own settings apply
        return search_params(index, knobs, selector)
    try:
        cache = index.__dict__.setdefault("_retrieval_search_params", {})
    except AttributeError:  # an object without attributes of its own: no cache
        return search_params(index, knobs, selector)
    key = (knobs, id(selector))
    entry = cache.get(key)
    if entry is None:
        if len(cache) >= PARAMS_CACHE_SIZE:
            cache.clear()
        entry = cache[key] = (search_params(index, knobs, selector), selector)
    return entry[0]


class Exclusions:
    """Deleted positions, as a FAISS selector (kept alive with its id array) and a lookup mask."""

    def __init__(self, positions: np.ndarray, total: int) -> None:
        import faiss

        self.positions = np.unique(np.asarray(positions, dtype=np.int64))
        self.mask = np.zeros(max(total, 0), bool)
        self.mask[self.positions[self.positions < total]] = True
        self._batch = faiss.IDSelectorBatch(self.positions) if len(self.positions) else None
        self.selector = faiss.IDSelectorNot(self._batch) if self._batch is not None else None

    def __len__(self) -> int:
        return len(self.positions)

    @classmethod
    def outside(cls, allowed: np.ndarray, selector: Any) -> Exclusions:
        """Every row where the bool mask ``allowed`` is False; ``selector`` admits exactly the allowed rows."""
        excluded = cls(np.zeros(0, np.int64), 0)
        excluded.positions, excluded.mask, excluded.selector = np.flatnonzero(~allowed), ~allowed, selector
        return excluded


def search(
    index: Any,
    queries: np.ndarray,
    k: int,
    knobs: SearchKnobs = SearchKnobs(),
    exclude: Exclusions | None = None,
    rerank_with: VectorSource | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product search; returns (scores, positions), each (q, k') with k' = min(k, live rows).

    With ``rerank_with``, a shortlist of ``k x rerank_factor`` is scored exactly
    with those vectors. Positions of a query with fewer than ``k'`` hits are -1.
    """
    queries = _as_matrix(queries)
    if queries.shape[1] != index.d:
        raise InputError(f"query vectors have dimension {queries.shape[1]}, the index has {index.d}")
    live = int(index.ntotal) - (len(exclude) if exclude is not None else 0)
    k = min(int(k), live)
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    if rerank_with is not None:
        native = index if is_refined(index) else rerank_with.native_reranker(index)
        if native is not None:  # FAISS re-ranks in C++ from the same rows; else numpy does, below
            index, rerank_with = native, None
    shortlist = k
    if rerank_with is not None:
        shortlist = min(live, k * (knobs.rerank_factor or DEFAULT_RERANK_FACTOR))
    selector = exclude.selector if exclude is not None else None
    if getattr(index, "supports_selector", True):
        params = _cached_search_params(index, knobs, selector)
        scores, positions = (
            index.search(queries, shortlist, params=params) if params is not None else index.search(queries, shortlist)
        )
    else:  # a GPU or torch index: over-fetch and drop the deleted rows here
        scores, positions = index.search(queries, min(int(index.ntotal), shortlist + (len(exclude) if exclude else 0)))
        scores, positions = drop_excluded(scores, positions, exclude, shortlist)
    positions = positions.astype(np.int64, copy=False)
    if rerank_with is not None:
        scores, positions = rerank(queries, positions, rerank_with)
    return scores[:, :k], positions[:, :k]


def drop_excluded(
    scores: np.ndarray, positions: np.ndarray, exclude: Exclusions | None, keep: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``keep`` hits of each row that are not excluded (for searchers without an ID selector)."""
    if exclude is None or not len(exclude):
        return scores[:, :keep], positions[:, :keep]
    valid = positions >= 0
    hit = np.zeros_like(valid)
    hit[valid] = exclude.mask[positions[valid]]
    order = np.argsort(hit, axis=1, kind="stable")  # live rows first, their order kept
    scores = np.take_along_axis(np.where(hit, -np.inf, scores), order, axis=1)[:, :keep]
    positions = np.take_along_axis(np.where(hit, -1, positions), order, axis=1)[:, :keep]
    return scores.astype(np.float32), positions


def rerank(
    queries: np.ndarray, candidates: np.ndarray, vectors: VectorSource, block: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidate rows, sorted best first (-1 candidates last).

    Queries go in blocks so the gathered candidate rows stay small (cache-sized) whatever the batch.
    """
    exact = np.empty(candidates.shape, np.float32)
    for start in range(0, len(queries), block):
        rows = vectors.take(candidates[start : start + block])  # (b, s, d)
        exact[start : start + block] = np.matmul(rows, queries[start : start + block, :, None])[..., 0]
    exact[candidates < 0] = -np.inf
    order = np.argsort(-exact, axis=1, kind="stable")
    return np.take_along_axis(exact, order, axis=1), np.take_along_axis(candidates, order, axis=1)


def to_available_gpus(index: Any) -> Any:
    """Move ``index`` to all GPUs when faiss was built with GPU support; else return it unchanged."""
    import faiss

    if not gpu_count():
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = True
    gpu_index = faiss.index_cpu_to_all_gpus(index, co=options)
    return _NoSelector(gpu_index)


def gpu_count() -> int:
    """GPUs faiss can use (0 for faiss-cpu)."""
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


class _NoSelector:
    """Wraps an index whose search takes no ID selector (FAISS GPU indexes): deletions are filtered after."""

    supports_selector = False

    def __init__(self, index: Any) -> None:
        self.index = index

    def __getattr__(self, name: str) -> Any:
        return getattr(self.index, name)

    def search(self, queries: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        found: tuple[np.ndarray, np.ndarray] = self.index.search(queries, k)
        return found


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise InputError(f"expected a 2-D matrix of vectors, got shape {vectors.shape}")
    return vectors


def read_vector_index(path: str, mmap: bool = True) -> Any:
    """Load a FAISS index file; IVF lists (and flat/HNSW storage) are memory-mapped when ``mmap``,
    and so are the float16 re-ranking codes of a refined (``ivfpq``) index.

    A memory-mapped IVF index is searched straight from the file, so an index
    larger than RAM stays searchable (the OS keeps the hot lists in page cache).
    """
    import faiss

    if not mmap:
        return faiss.read_index(str(path))
    with open(path, "rb") as file:
        refined = file.read(4) == REFINE_FOURCC
    if refined:  # IVF-PQ + float16 codes for re-ranking: the codes (most of the file) are mapped, not read
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    try:
        return without_prefetch_threads(faiss.read_index(str(path), flags))
    except RuntimeError:
        return faiss.read_index(str(path), getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | faiss.IO_FLAG_READ_ONLY)


def without_prefetch_threads(index: Any) -> Any:
    """``index`` with its memory-mapped IVF lists set to prefetch on no threads of their own.

    FAISS's ``OnDiskInvertedLists`` start ``prefetch_nthread`` threads on every search to touch the
    probed lists, which costs a single query many times its search (benchmarks/SERVE.md). The OS
    pages the mapped lists in on first use anyway, so nothing is lost.
    """
    import faiss

    ivf = _ivf_of(index)
    lists: Any = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if hasattr(lists, "prefetch_nthread"):
        lists.prefetch_nthread = 0
    return index
