"""Measure an approximate index against exact search, and tune its search knobs to a target recall.

Run after every build and update: the recall and latency in the manifest are
measured on this collection, not assumed from the index type.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.core.search import SearchKnobs
from retrieval.index.source import VectorSource
from retrieval.index.spec import IndexSpec
from retrieval.index.vector_index import Exclusions, search

RECALL_QUERIES = (
    1000  # sampled per vector set: the even-numbered half tunes the knobs, the odd half measures the reported recall
)
TIE_TOLERANCE = (
    1e-5  # a found item within this (relative, at least absolute) of the k-th exact score is a tie, not a miss
)
CONFIDENCE_Z = 1.645  # a knob is kept when the one-sided 95% lower bound of its recall@10 reaches the target
LATENCY_QUERIES = 50
NPROBE_STEPS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
EF_SEARCH_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
RERANK_STEPS = (2, 4, 10, 20, 40)  # shortlist = k x factor; tuning starts at the widest and shrinks it
EXACT_BLOCK_BYTES = 256 << 20


def exact_search(
    source: VectorSource, queries: np.ndarray, k: int, exclude: Exclusions | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` inner products over ``source``, streamed in blocks (works for shards on disk)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), 0), np.int64)
    start = 0
    # per row of a block: its float32 vector, and per query a float32 score and an int64 partition index
    block_rows = max(1024, EXACT_BLOCK_BYTES // max(1, 4 * source.dim + 12 * len(queries)))
    for chunk in source.chunks(block_rows):
        scores = queries @ chunk.T
        rows = np.arange(start, start + len(chunk), dtype=np.int64)
        if exclude is not None and len(exclude):
            scores[:, exclude.mask[start : start + len(chunk)]] = -np.inf
        kk = min(k, scores.shape[1])
        top = np.argpartition(scores, scores.shape[1] - kk, axis=1)[:, -kk:]  # no negated copy of the block
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        best_rows = np.concatenate([best_rows, rows[top]], axis=1)
        if best_scores.shape[1] > k:
            keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
            best_scores = np.take_along_axis(best_scores, keep, axis=1)
            best_rows = np.take_along_axis(best_rows, keep, axis=1)
        start += len(chunk)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_rows, order, axis=1)


def recall_per_query(relevant_in_top_k: np.ndarray, could_hold: np.ndarray | int) -> np.ndarray:
    """Recall@k of each query: the one definition every recall in this package goes through.

    ``relevant_in_top_k``: how many relevant items a query's top k holds;
    ``could_hold``: the most it could hold (``min(k, relevant items)``). A query
    with nothing to find (``could_hold`` 0) scores 1.
    """
    found = np.asarray(relevant_in_top_k, np.float64)
    wanted = np.broadcast_to(np.asarray(could_hold, np.float64), found.shape)
    out = np.ones(found.shape, np.float64)
    np.divide(np.minimum(found, wanted), wanted, out=out, where=wanted > 0)
    return out


def recall_from_ranks(ranks: np.ndarray, k: int) -> np.ndarray:
    """Recall@k of queries with one relevant item (or judged by their best-placed one), from its 0-based rank.

    Ranks are computed with ties counted against the query; -1 means not found.
    """
    ranks = np.asarray(ranks)
    return recall_per_query((ranks >= 0) & (ranks < k), 1)


def neighbour_recall(found_scores: np.ndarray, exact_scores: np.ndarray, k: int) -> np.ndarray:
    """Recall@k of each query of an approximate search against exact search, ties counted as found.

    ``found_scores``: the exact scores of the items the search returned (best
    first, -inf for padding); ``exact_scores``: exact search's top scores (-inf
    where fewer items are live). A returned item is relevant when its score
    reaches the k-th exact score (less ``TIE_TOLERANCE``), so among duplicates any
    copy counts, as in FAISS's ``check_ref_knn_with_draws``.
    """
    exact = np.asarray(exact_scores, np.float64)[:, :k]
    could_hold = np.isfinite(exact).sum(axis=1)
    kth = (
        np.take_along_axis(exact, np.maximum(could_hold - 1, 0)[:, None], axis=1)[:, 0]
        if exact.shape[1]
        else np.zeros(len(exact))
    )
    threshold = np.where(could_hold > 0, kth - TIE_TOLERANCE * np.maximum(1.0, np.abs(np.nan_to_num(kth))), np.inf)
    found = np.asarray(found_scores, np.float64)[:, :k]
    return recall_per_query((found >= threshold[:, None]).sum(axis=1), could_hold)


def exact_scores_of(
    source: VectorSource, queries: np.ndarray, found: np.ndarray, exclude: Exclusions | None = None
) -> np.ndarray:
    """Exact scores of the returned positions ``found`` (-inf for padding and deleted rows)."""
    scores: np.ndarray = np.einsum("qkd,qd->qk", source.take(found), np.asarray(queries, np.float32))
    dead = found < 0
    if exclude is not None and len(exclude):
        dead |= exclude.mask[np.maximum(found, 0)]
    scores[dead] = -np.inf
    return scores


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean recall@k of returned ids ``found`` against the exact ids ``truth`` (ids only: use on data without ties)."""
    k = min(k, truth.shape[1], found.shape[1])
    if k == 0 or len(truth) == 0:
        return 1.0
    overlap = [len(np.intersect1d(found[i, :k], truth[i, :k])) for i in range(len(truth))]
    return float(recall_per_query(np.array(overlap), k).mean())


def lower_bound(per_query: np.ndarray) -> float:
    """One-sided 95% lower confidence bound of the mean recall (what tuning compares with the target)."""
    if len(per_query) < 2:
        return float(per_query.mean()) if len(per_query) else 1.0
    return float(per_query.mean() - CONFIDENCE_Z * per_query.std(ddof=1) / np.sqrt(len(per_query)))


@dataclass
class RecallReport:
    """What a build measured: recall@1/10 on held-out queries and latency at the chosen knobs, and the tuning trail.

    ``queries`` held-out queries measured the reported recall; ``tuning_queries``
    others chose the knobs (``held_out`` False: too few queries to split, both are
    the same). ``query_source`` names where they come from: the other kind of item
    (``images`` / ``captions``), or ``self`` when the index holds only one kind.
    """

    knobs: SearchKnobs
    recall_at_1: float
    recall_at_10: float
    latency_ms_median: float
    batch_qps: float
    queries: int
    query_source: str
    target_recall: float | None = None
    target_reached: bool = True
    tuning: list[dict[str, Any]] = field(default_factory=list)
    tuning_queries: int = 0
    held_out: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "knobs": self.knobs.to_json(),
            "recall@1": round(self.recall_at_1, 4),
            "recall@10": round(self.recall_at_10, 4),
            "latency_ms_median": round(self.latency_ms_median, 4),
            "batch_qps": round(self.batch_qps, 1),
            "queries": self.queries,
            "query_source": self.query_source,
            "tuning_queries": self.tuning_queries,
            "held_out": self.held_out,
            "target_recall": self.target_recall,
            "target_reached": self.target_reached,
            "tuning": self.tuning,
        }


@dataclass
class RecallProbe:
    """Queries with their exact top-10 scores: measures one knob setting of an index against exact search."""

    index: Any
    source: VectorSource
    queries: np.ndarray
    exclude: Exclusions | None = None
    rerank_with: VectorSource | None = None

    def __post_init__(self) -> None:
        self.queries = np.ascontiguousarray(self.queries, dtype=np.float32)
        self.exact, _ = exact_search(self.source, self.queries, 10, self.exclude)

    def measure(self, knobs: SearchKnobs) -> tuple[float, float, float, float]:
        """(recall@1, recall@10, its lower confidence bound, batch seconds) of one knob setting."""
        started = time.perf_counter()
        _, found = search(self.index, self.queries, 10, knobs, self.exclude, self.rerank_with)
        seconds = time.perf_counter() - started
        scores = exact_scores_of(self.source, self.queries, found, self.exclude)
        at1, at10 = neighbour_recall(scores, self.exact, 1), neighbour_recall(scores, self.exact, 10)
        return _mean(at1), _mean(at10), lower_bound(at10), seconds


def _mean(per_query: np.ndarray) -> float:
    return float(per_query.mean()) if len(per_query) else 1.0


def split_queries(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(tuning queries, held-out queries, whether they differ): even and odd rows; one query serves as both."""
    if len(queries) < 2:
        return queries, queries, False
    return queries[0::2], queries[1::2], True


def _latency_ms(
    index: Any, queries: np.ndarray, knobs: SearchKnobs, exclude: Exclusions | None, rerank_with: VectorSource | None
) -> float:
    times = []
    for query in queries[:LATENCY_QUERIES]:
        started = time.perf_counter()
        search(index, query[None, :], 10, knobs, exclude, rerank_with)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000) if times else 0.0


def _candidates(spec: IndexSpec, index: Any) -> list[SearchKnobs]:
    """Knob settings to try, cheapest first (re-ranked indexes: with the widest shortlist, shrunk afterwards)."""
    if spec.nlist:
        steps = [n for n in NPROBE_STEPS if n <= spec.nlist] or [spec.nlist]
        factor = RERANK_STEPS[-1] if spec.rerank else None
        return [SearchKnobs(nprobe=n, rerank_factor=factor) for n in steps]
    if spec.hnsw_m:
        return [SearchKnobs(ef_search=ef) for ef in EF_SEARCH_STEPS]
    return [SearchKnobs()]


def fastest_shortlist(
    widest: SearchKnobs,
    widest_seconds: float,
    nprobes: list[int | None],
    attempt: Callable[[SearchKnobs], tuple[bool, float]],
) -> SearchKnobs:
    """The fastest (nprobe, shortlist factor) reaching the target, starting from the widest shortlist's.

    A shorter shortlist re-ranks less but may need more lists probed to keep the
    recall; each factor gets the fewest probes that reach the target, and a factor
    stops being probed further once it is slower than the best so far.
    """
    best, best_seconds = widest, widest_seconds
    start = nprobes.index(widest.nprobe)
    for factor in reversed(RERANK_STEPS[:-1]):
        ok = False
        for position in range(start, len(nprobes)):
            knobs = SearchKnobs(nprobe=nprobes[position], rerank_factor=factor)
            ok, seconds = attempt(knobs)
            if ok or seconds > best_seconds:
                break
        if not ok:
            break  # this factor cannot beat the best; shorter ones need still more probes
        start = position
        if seconds < best_seconds:
            best, best_seconds = knobs, seconds
    return best


def measure_and_tune(
    index: Any,
    spec: IndexSpec,
    source: VectorSource,
    queries: np.ndarray,
    query_source: str,
    target_recall: float | None,
    exclude: Exclusions | None = None,
    fixed: SearchKnobs | None = None,
) -> RecallReport:
    """Recall@1/10 of ``index`` against exact search over ``source``, and its latency.

    ``queries`` are split in two (see :func:`split_queries`). With a
    ``target_recall``, the knob settings are tried on the tuning half from cheapest
    up, and the first whose recall@10 reaches it with 95% confidence is kept (the
    last one when none does); the recall reported is then measured on the other,
    held-out half, so it is not flattered by the choice. ``fixed`` skips tuning.
    """
    queries = np.ascontiguousarray(queries[:RECALL_QUERIES], dtype=np.float32)
    rerank_with = source if spec.rerank else None
    tuning_queries, held_queries, held_out = split_queries(queries)
    tuning = RecallProbe(index, source, tuning_queries, exclude, rerank_with)
    held = RecallProbe(index, source, held_queries, exclude, rerank_with) if held_out else tuning
    trail: list[dict[str, Any]] = []

    def attempt(knobs: SearchKnobs) -> tuple[bool, float]:
        r1, r10, bound, seconds = tuning.measure(knobs)
        trail.append(
            {
                **knobs.to_json(),
                "recall@1": round(r1, 4),
                "recall@10": round(r10, 4),
                "recall@10_lower_bound": round(bound, 4),
                "batch_seconds": round(seconds, 5),
            }
        )
        return target_recall is not None and bound >= target_recall, seconds

    candidates = [fixed] if fixed is not None else _candidates(spec, index)
    chosen = candidates[-1]
    reached = target_recall is None
    for knobs in candidates:
        ok, seconds = attempt(knobs)
        if ok:
            chosen, reached = knobs, True
            break
    if spec.rerank and reached and fixed is None:
        chosen = fastest_shortlist(chosen, seconds, [c.nprobe for c in candidates], attempt)
    r1, r10, _, seconds = held.measure(chosen)
    return RecallReport(
        knobs=chosen,
        recall_at_1=r1,
        recall_at_10=r10,
        latency_ms_median=_latency_ms(index, held.queries, chosen, exclude, rerank_with),
        batch_qps=len(held.queries) / seconds if seconds > 0 else 0.0,
        queries=len(held.queries),
        query_source=query_source,
        target_recall=target_recall,
        target_reached=reached or target_recall is None,
        tuning=trail,
        tuning_queries=len(tuning.queries),
        held_out=held_out,
    )
