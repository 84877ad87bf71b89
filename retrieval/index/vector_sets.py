"""One searchable vector set of an index: float16 vectors on disk + a FAISS index + what was measured.

Shared by builds and updates (``add``, ``remove``): choose the index type
(``auto`` under a memory budget), build it, measure recall and latency against
exact search, tune the search knobs, and describe all of it for the manifest.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.core.config import IndexOptions
from retrieval.core.errors import InputError
from retrieval.core.search import SearchKnobs
from retrieval.index.ivf_lists import shard_bounds, split_index
from retrieval.index.recall import RECALL_QUERIES, RecallReport, measure_and_tune
from retrieval.index.source import VectorSource, as_source
from retrieval.index.spec import (
    IVF_MIN_POINTS_PER_LIST,
    PQ_MIN_TRAINING,
    IndexChoice,
    IndexSpec,
    choose_index,
    estimate_bytes,
    spec_for,
)
from retrieval.index.vector_index import (
    Exclusions,
    build_vector_index,
    pre_transforms,
    train_vector_index,
    without_refinement,
)

IndexBuilder = Callable[[VectorSource, IndexSpec], Any]

log = logging.getLogger(__name__)

MIN_TRAINABLE = 2 * IVF_MIN_POINTS_PER_LIST  # fewer vectors than this are searched exactly whatever the type asked
DRIFT_RATIO = 1.25  # new vectors this much farther from their list centroids than the training sample: retrain
GROWTH_RATIO = 4.0  # or the collection this many times larger than when the lists were trained


@dataclass
class VectorSet:
    """The vectors of one FAISS index of a build and the queries its recall is measured with.

    ``query_source`` is recorded with the recall: the other kind of item
    (``images`` / ``captions``) when it shares the space and has rows, else
    ``self`` (the set's own rows query it: an index with one kind of item).
    """

    key: str  # "<space>/<kind>", e.g. "clip/image" or "projected/caption"
    vectors: VectorSource | np.ndarray
    queries: np.ndarray
    query_source: str

    @property
    def space(self) -> str:
        return self.key.split("/")[0]

    @property
    def kind(self) -> str:
        return self.key.split("/")[1]


def query_key(key: str, spaces: dict[str, str], counts: dict[str, int]) -> tuple[str, str]:
    """(vector set whose rows query ``key``, its name): the other kind in the same space when it has rows."""
    space, kind = key.split("/")
    other = "caption" if kind == "image" else "image"
    candidate: str | None
    if space == "projected":  # projected items are searched with the other kind's own encoder vectors
        candidate = f"{spaces[other]}/{other}"
    else:
        candidate = f"{space}/{other}" if spaces[other] == space else None
    if candidate and counts.get(other):
        return candidate, f"{other}s"
    return key, "self"


def split_budget(sets: Sequence[tuple[str, int, int]], max_memory: int | None) -> dict[str, int | None]:
    """Share a memory budget among vector sets in proportion to their uncompressed sizes (n x d)."""
    if max_memory is None:
        return {key: None for key, _, _ in sets}
    total = sum(n * d for _, n, d in sets) or 1
    return {key: max(1, int(max_memory * n * d / total)) for key, n, d in sets}


def choose(options: IndexOptions, n: int, d: int, budget: int | None) -> IndexChoice:
    """The index for ``n`` vectors: ``auto`` picks within ``budget``; a named type is taken as asked,
    except that a set too small to train lists or codebooks gets exact search."""
    if options.index_type.lower() == "auto":
        return choose_index(n, d, budget, options.target_recall)
    needed = PQ_MIN_TRAINING if options.index_type.lower() == "ivfpq" else MIN_TRAINABLE
    spec = spec_for(options.index_type, max(n, 1), d) if n >= needed else spec_for("flat", n, d)
    if spec.type == "flat" and options.index_type.lower() != "flat":
        reason = (
            f"asked for {options.index_type}, but {n} vectors are too few to train it (at least {needed}): exact search"
        )
    else:
        reason = f"asked for {options.index_type}"
    return IndexChoice(spec, reason, estimate_bytes(spec, n, d), budget, options.target_recall)


def sample_queries(vectors: VectorSource | np.ndarray, seed: int = 1) -> np.ndarray:
    """Up to ``RECALL_QUERIES`` rows chosen at random, to tune the knobs with (half) and measure recall with (the other
    half)."""
    return as_source(vectors).sample(RECALL_QUERIES, seed=seed)


def mean_residual(index: Any, vectors: np.ndarray) -> float | None:
    """Mean (1 - inner product) of vectors to their nearest IVF list centroid (None without lists)."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(x) == 0:
        return None
    for transform in pre_transforms(without_refinement(index)):
        x = transform.apply(x)
    similarity, _ = ivf.quantizer.search(x, 1)
    return float(np.mean(1.0 - similarity[:, 0]))


def measure(
    index: Any,
    spec: IndexSpec,
    vector_set: VectorSet,
    target: float | None,
    exclude: Exclusions | None = None,
    fixed: SearchKnobs | None = None,
) -> RecallReport | None:
    """Recall and latency of ``index`` on its vector set, knobs tuned to ``target`` (None when empty)."""
    source = as_source(vector_set.vectors)
    if len(source) == 0 or len(vector_set.queries) == 0:
        return None
    report = measure_and_tune(index, spec, source, vector_set.queries, vector_set.query_source, target, exclude, fixed)
    if not report.target_reached:
        log.warning(
            "%s: recall@10 %.3f at the widest search setting tried, below the target %.2f",
            vector_set.key,
            report.recall_at_10,
            target,
        )
    return report


def describe(
    choice: IndexChoice, report: RecallReport | None, n: int, d: int, trained_on: int, residual: float | None
) -> dict[str, Any]:
    """The manifest record of one vector index."""
    return {
        "count": n,
        "dim": d,
        "choice": choice.to_json(),
        "measured": report.to_json() if report else None,
        "trained": {"count": trained_on, "mean_residual": residual},
    }


def build_searchable(
    vector_set: VectorSet,
    options: IndexOptions,
    budget: int | None,
    progress: bool = False,
    build: IndexBuilder | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Build, measure and tune the FAISS index of one vector set; returns (index, manifest record).

    ``build(vectors, spec)`` builds the index instead of :func:`build_vector_index` (a distributed build).
    """
    source = as_source(vector_set.vectors)
    n, d = len(source), source.dim
    choice = choose(options, n, d, budget)
    if options.shards > 1 and n > 1 and choice.spec.type in ("hnsw",):
        raise InputError(f"{vector_set.key}: an HNSW graph cannot be split into index shards; use flat or an IVF type")
    index = (
        build(source, choice.spec) if build is not None else build_vector_index(source, choice.spec, progress=progress)
    )
    residual = mean_residual(index, source.sample(min(n, 10_000), seed=2)) if choice.spec.needs_training else None
    report = measure(index, choice.spec, vector_set, options.target_recall)
    return index, describe(choice, report, n, d, n, residual)


def knobs_of(record: dict[str, Any] | None) -> SearchKnobs:
    """The tuned search knobs stored in a manifest record."""
    measured = (record or {}).get("measured") or {}
    return SearchKnobs.from_json(measured.get("knobs"))


def spec_of(record: dict[str, Any] | None) -> IndexSpec:
    """The index spec stored in a manifest record (flat for indexes written before records existed)."""
    if not record:
        return IndexSpec("flat", "Flat")
    return IndexSpec.from_json(record["choice"]["spec"])


def needs_retraining(record: dict[str, Any], index: Any, new_vectors: np.ndarray, total_after: int) -> str | None:
    """Why an index should be retrained before new vectors go in, or None.

    Trained indexes (IVF lists, PQ codebooks) are kept while new data looks like
    the training data: retrain when the new vectors sit on average more than
    ``DRIFT_RATIO`` x farther from their nearest list centroid than the training
    sample did, or when the collection has grown ``GROWTH_RATIO`` x since training
    (the number of lists chosen for it is then too small).
    """
    trained = record.get("trained") or {}
    if not spec_of(record).needs_training:
        return None
    if trained.get("count") and total_after > GROWTH_RATIO * trained["count"]:
        return f"the collection grew from {trained['count']} to {total_after} vectors since training"
    before = trained.get("mean_residual")
    now = mean_residual(index, new_vectors)
    if before and now is not None and now > DRIFT_RATIO * before:
        return f"new vectors are {now / before:.2f}x farther from their list centroids than the training data"
    return None


def write_vector_sets(
    writer: Any,
    files: dict[str, Any],
    manifest: dict[str, Any],
    sets: Sequence[VectorSet],
    options: IndexOptions,
    progress: bool = False,
    distributed: Any = None,
) -> None:
    """Write each set's float16 vectors and FAISS index, and its measured record, into a build.

    ``distributed`` (a :class:`~retrieval.index.ray_shards.RayIndexBuild`): IVF indexes are filled in
    parallel parts and merged. ``options.shards`` > 1: each index is written as that many index shards.
    """
    budgets = split_budget(
        [(s.key, len(as_source(s.vectors)), as_source(s.vectors).dim) for s in sets], options.max_memory
    )
    records = manifest.setdefault("vector_indexes", {})
    for vector_set in sets:
        stem = f"{vector_set.space}-{vector_set.kind}"
        files["vectors"][vector_set.key] = writer.write_vectors(vector_set.space, vector_set.kind, vector_set.vectors)
        lists: list[str] = []
        build = None
        if distributed is not None:
            build = functools.partial(build_from_parts, writer, stem, distributed, lists, options.shards > 1)
        index, record = build_searchable(vector_set, options, budgets[vector_set.key], progress, build)
        if distributed is not None and stem in distributed.part_counts:
            record["parts"] = {"count": distributed.part_counts[stem], "merged": "on disk" if lists else "in memory"}
        shards = min(options.shards, int(index.ntotal))
        if shards > 1:
            bounds = shard_bounds(int(index.ntotal), shards)
            files.setdefault("faiss_shards", {})[vector_set.key] = [
                writer.write_faiss(f"{stem}-shard{number:03d}", shard)
                for number, shard in enumerate(split_index(index, bounds))
            ]
            record["shards"] = [list(bound) for bound in bounds]
        else:
            files["faiss"][vector_set.key] = writer.write_faiss(stem, index)
        if lists:
            files.setdefault("faiss_lists", {})[vector_set.key] = writer.record(lists[0])
        records[vector_set.key] = record


def build_from_parts(
    writer: Any, stem: str, distributed: Any, lists: list[str], in_memory: bool, source: VectorSource, spec: IndexSpec
) -> Any:
    """An IVF index trained here and filled in parallel parts, merged in memory or, when large, into one
    ``.ivfdata`` file of the build (its relative path appended to ``lists``). Other types: built here."""
    if spec.nlist is None:
        return build_vector_index(source, spec)  # flat needs no merge; HNSW graphs cannot be merged
    trained = train_vector_index(source, spec)
    paths = distributed.fill_parts(stem, trained, source)
    if not in_memory and distributed.merges_on_disk(estimate_bytes(spec, len(source), source.dim)):
        rel, path = writer.new_file("faiss", stem, ".ivfdata")
        index = distributed.merge_on_disk(trained, paths, path)
        lists.append(rel)
    else:
        index = distributed.merge_in_ram(trained, paths)
    distributed.finish(stem)
    return index
