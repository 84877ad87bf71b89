"""Approximate indexes, knobs, deletions, re-ranking and memory mapping, against exact brute force."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrieval.core.errors import InputError
from retrieval.index.recall import (
    exact_scores_of,
    exact_search,
    fastest_shortlist,
    measure_and_tune,
    neighbour_recall,
    recall_at,
)
from retrieval.index.source import RowSubset, VectorSource
from retrieval.index.spec import (
    IndexSpec,
    SearchKnobs,
    choose_index,
    estimate_bytes,
    nlist_for,
    parse_memory,
    spec_for,
)
from retrieval.index.torch_search import TorchFlatIndex, torch_cuda_available
from retrieval.index.vector_index import (
    Exclusions,
    build_vector_index,
    empty_copy,
    gpu_count,
    is_refined,
    read_vector_index,
    rerank,
    search,
    to_available_gpus,
)
from retrieval.index.vector_sets import mean_residual, needs_retraining, split_budget


def clustered(n: int, d: int, seed: int = 0, clusters: int = 50, spread: float = 0.6) -> np.ndarray:
    """Unit vectors around ``clusters`` centres: a structure ANN indexes are built for."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(data: np.ndarray, queries: np.ndarray, k: int, deleted: np.ndarray | None = None) -> np.ndarray:
    scores = queries @ data.T
    if deleted is not None:
        scores[:, deleted] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


DATA = clustered(6000, 32)
QUERIES = clustered(100, 32, seed=1)
FRESH_QUERIES = clustered(200, 32, seed=2)


@pytest.fixture(scope="module")
def built():
    """One index of each type over DATA (OPQ training is the slow part: build once)."""
    cache = {}

    def get(index_type):
        if index_type not in cache:
            spec = spec_for(index_type, len(DATA), DATA.shape[1])
            cache[index_type] = (spec, build_vector_index(VectorSource(DATA), spec))
        return cache[index_type]

    return get


# -- choosing ------------------------------------------------------------------------------


def test_parse_memory():
    assert parse_memory("4GB") == 4 << 30
    assert parse_memory("512mb") == 512 << 20
    assert parse_memory("1.5g") == int(1.5 * (1 << 30))
    assert parse_memory("2000") == 2000
    assert parse_memory(None) is None
    for bad in ("lots", "4 parsecs", "-1GB", "0"):
        with pytest.raises(InputError):
            parse_memory(bad)


def test_nlist_grows_with_sqrt_n_and_keeps_enough_training_points():
    assert nlist_for(1_000_000) == 4096
    assert nlist_for(100_000) == 1024
    for n in (100, 1000, 5000):
        assert nlist_for(n) * 39 <= n


def test_auto_choice_follows_size_and_budget():
    small = choose_index(10_000, 512)
    assert small.spec.type == "flat" and "exact" in small.reason
    big = choose_index(1_000_000, 512, parse_memory("4GB"))
    assert big.spec.type == "ivfsq" and big.spec.factory == "IVF4096,SQfp16" and big.estimated_bytes <= 4 << 30
    assert big.estimated_bytes < 0.55 * estimate_bytes(spec_for("ivf", 1_000_000, 512), 1_000_000, 512)  # float16 lists
    squeezed = choose_index(10_000_000, 512, parse_memory("4GB"), 0.9)
    assert squeezed.spec.type == "ivfpq" and squeezed.spec.rerank and squeezed.estimated_bytes <= 4 << 30
    assert "over the 4.0 GB budget" in squeezed.reason
    assert squeezed.spec.train_size < 10_000_000  # trained on a sample
    with pytest.raises(InputError, match="raise `IndexOptions.max_memory`"):
        choose_index(10_000_000, 512, parse_memory("100MB"))
    with pytest.raises(InputError, match="over the"):
        choose_index(50, 512, 1000)


def test_budget_is_shared_in_proportion_to_size():
    budgets = split_budget([("a", 1000, 512), ("b", 3000, 512)], 4000)
    assert budgets == {"a": 1000, "b": 3000}
    assert split_budget([("a", 10, 4)], None) == {"a": None}


def test_unknown_type_and_factory_strings():
    with pytest.raises(InputError, match="unknown index type"):
        spec_for("fast", 1000, 32)
    spec = spec_for("IVF16,SQ8", 1000, 32)
    assert spec.type == "factory" and spec.factory == "IVF16,SQ8"
    with pytest.raises(InputError, match="divisible"):
        spec_for("ivfpq", 1000, 30, pq_m=8)


# -- searching -----------------------------------------------------------------------------


@pytest.mark.parametrize("index_type", ["hnsw", "ivf", "ivfsq", "ivfpq", "IVF32,SQ8"])
def test_approximate_types_reach_their_target_on_queries_they_were_not_tuned_on(index_type, built):
    source = VectorSource(DATA)
    spec, index = built(index_type)
    report = measure_and_tune(index, spec, source, QUERIES, "test", target_recall=0.95)
    rerank_with = source if spec.rerank else None
    # the recall reported is the held-out (odd-numbered) half's, recomputed here against numpy brute force
    held = QUERIES[1::2]
    _, found = search(index, held, 10, report.knobs, rerank_with=rerank_with)
    assert report.queries == len(held) and report.tuning_queries == len(QUERIES) - len(held) and report.held_out
    assert recall_at(found, brute_force(DATA, held, 10), 10) == pytest.approx(report.recall_at_10)
    if spec.type != "factory":  # a raw factory string is not tuned
        assert report.target_reached
        _, fresh = search(index, FRESH_QUERIES, 10, report.knobs, rerank_with=rerank_with)  # queries nobody tuned on
        assert recall_at(fresh, brute_force(DATA, FRESH_QUERIES, 10), 10) >= 0.93
    assert report.latency_ms_median > 0 and report.tuning


def with_duplicates(copies: int = 40) -> np.ndarray:
    """2,000 clustered vectors plus ``copies`` identical ones (a template caption, the same photo twice...)."""
    base = clustered(2000, 32, seed=3)
    return np.concatenate([base, np.repeat(base[:1], copies, axis=0)])


def near_duplicates(data: np.ndarray, n: int, seed: int = 5) -> np.ndarray:
    """Queries close to the duplicated vector (whose top 10 are all ties) mixed with ordinary ones."""
    rng = np.random.default_rng(seed)
    near = data[-1] + 0.01 * rng.standard_normal((n, data.shape[1]))
    queries = np.concatenate([near, clustered(n, data.shape[1], seed=seed + 1)]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries[rng.permutation(len(queries))]


def test_ties_among_duplicates_are_found_not_missed():
    data = with_duplicates()
    queries = near_duplicates(data, 100)
    exact, _ = exact_search(VectorSource(data), queries, 10)
    found = np.tile(np.arange(len(data) - 40, len(data) - 30), (len(queries), 1))  # any 10 of the 40 copies
    on_duplicates = exact[:, 9] > 0.99
    scores = exact_scores_of(VectorSource(data), queries, found)
    assert on_duplicates.sum() > 50 and (neighbour_recall(scores, exact, 10)[on_duplicates] == 1.0).all()
    assert (
        neighbour_recall(scores, exact, 10)[~on_duplicates].max() == 0.0
    )  # copies are not the neighbours of the others
    padded = np.full_like(found, -1)
    assert (neighbour_recall(exact_scores_of(VectorSource(data), queries, padded), exact, 10) == 0.0).all()
    # fewer live items than k: what could be found is all that is asked
    few = np.full((1, 10), -np.inf)
    few[0, :3] = [0.9, 0.8, 0.7]
    assert neighbour_recall(np.array([[0.9, 0.8, -np.inf]]), few, 10)[0] == pytest.approx(2 / 3)
    assert neighbour_recall(np.full((1, 10), -np.inf), np.full((1, 10), -np.inf), 10)[0] == 1.0


def test_ivf_tuning_with_duplicates_stops_at_a_small_nprobe():
    data = with_duplicates()
    source = VectorSource(data)
    spec = spec_for("ivf", len(data), 32)
    index = build_vector_index(source, spec)
    report = measure_and_tune(index, spec, source, near_duplicates(data, 300), "self", target_recall=0.95)
    assert (
        report.target_reached and report.knobs.nprobe <= 8 < spec.nlist
    )  # ids alone: 0.61 at every nprobe, climbs to 32
    fresh = near_duplicates(data, 100, seed=11)  # queries the tuner never saw
    _, found = search(index, fresh, 10, report.knobs)
    exact, _ = exact_search(source, fresh, 10)
    assert neighbour_recall(exact_scores_of(source, fresh, found), exact, 10).mean() >= 0.93


def test_ivf_visiting_every_list_is_exact():
    spec = spec_for("ivf", len(DATA), 32)
    index = build_vector_index(DATA, spec)
    scores, found = search(index, QUERIES, 10, SearchKnobs(nprobe=spec.nlist))
    np.testing.assert_array_equal(found, brute_force(DATA, QUERIES, 10))
    one = search(index, QUERIES, 10, SearchKnobs(nprobe=1))[1]
    assert recall_at(one, found, 10) < 1.0  # the knob is really applied per query


def test_float16_lists_visiting_every_list_are_exact_over_the_stored_float16_vectors(built):
    spec, index = built("ivfsq")
    stored = DATA.astype(np.float16).astype(np.float32)  # what the store keeps
    scores, found = search(index, QUERIES, 10, SearchKnobs(nprobe=spec.nlist))
    np.testing.assert_allclose(scores, np.take_along_axis(QUERIES @ stored.T, found, axis=1), atol=1e-5)
    assert recall_at(found, brute_force(stored, QUERIES, 10), 10) >= 0.999  # only exact near-ties may swap


def test_ivfpq_reranks_in_faiss_from_the_stored_float16_rows_without_copying_them(built):
    spec, index = built("ivfpq")
    stored16 = DATA.astype(np.float16)
    source = VectorSource(stored16)
    native = source.native_reranker(index)
    assert is_refined(native) and not faiss.downcast_index(native.refine_index).codes.is_owned  # a view, no copy
    knobs = SearchKnobs(nprobe=spec.nlist, rerank_factor=20)
    scores, found = search(index, QUERIES, 5, knobs, rerank_with=source)
    stored = stored16.astype(np.float32)
    np.testing.assert_allclose(scores, np.take_along_axis(QUERIES @ stored.T, found, axis=1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-7).all()
    in_numpy = search(
        index, QUERIES, 5, knobs, rerank_with=VectorSource([stored16[:100], stored16[100:]])
    )  # two parts: no view
    np.testing.assert_array_equal(in_numpy[1], found)
    short = search(index, QUERIES, 10, SearchKnobs(nprobe=spec.nlist, rerank_factor=1), rerank_with=source)[1]
    long = search(index, QUERIES, 10, SearchKnobs(nprobe=spec.nlist, rerank_factor=40), rerank_with=source)[1]
    truth = brute_force(stored, QUERIES, 10)
    assert recall_at(short, truth, 10) < recall_at(long, truth, 10)  # the shortlist factor is applied per query
    exclude = Exclusions(truth[:, 0], len(DATA))
    assert not np.isin(search(index, QUERIES, 10, knobs, exclude, rerank_with=source)[1], truth[:, 0]).any()


def test_python_rerank_of_an_index_without_refinement_is_exact():
    index = build_vector_index(DATA, IndexSpec("factory", "IVF16,PQ8", nlist=16, train_size=len(DATA)))
    candidates = np.array([[5, 3, -1, 7], [0, 1, 2, 3]])
    source = VectorSource([DATA[:4].astype(np.float16), DATA[4:]])
    scores, found = rerank(QUERIES[:2], candidates, source)
    expected = np.take_along_axis(QUERIES[:2] @ source.all().T, np.where(found < 0, 0, found), axis=1)
    np.testing.assert_allclose(scores[found >= 0], expected[found >= 0], atol=1e-6)
    assert found[0, -1] == -1 and set(found[0, :3]) == {3, 5, 7} and (np.diff(scores, axis=1) <= 0).all()
    _, searched = search(index, QUERIES, 5, SearchKnobs(nprobe=16, rerank_factor=20), rerank_with=source)
    assert recall_at(searched, brute_force(source.all(), QUERIES, 5), 5) >= 0.9


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf", "ivfsq"])
def test_deleted_rows_are_never_returned(index_type, built):
    _, index = built(index_type)
    truth = brute_force(DATA, QUERIES, 3)
    deleted = np.unique(truth[:, 0])  # every query's best hit
    exclude = Exclusions(deleted, len(DATA))
    knobs = SearchKnobs(nprobe=64, ef_search=256)
    _, found = search(index, QUERIES, 10, knobs, exclude=exclude)
    assert not np.isin(found, deleted).any()
    expected = brute_force(DATA, QUERIES, 10, deleted)
    assert recall_at(found, expected, 10) >= (1.0 if index_type == "flat" else 0.9)


def test_exclusions_leave_fewer_hits_than_k_padded():
    data = DATA[:5]
    index = build_vector_index(data, "flat")
    scores, found = search(index, QUERIES[:2], 10, exclude=Exclusions(np.array([0, 1, 2]), 5))
    assert found.shape == (2, 2) and set(found.ravel()) <= {3, 4}


def test_exact_search_streams_blocks_like_numpy(monkeypatch):
    import retrieval.index.recall as recall

    monkeypatch.setattr(recall, "EXACT_BLOCK_BYTES", 1)  # forces many blocks
    source = VectorSource([DATA[:1000].astype(np.float16), DATA[1000:2500]])
    scores, found = exact_search(source, QUERIES, 7)
    reference = np.concatenate([DATA[:1000].astype(np.float16).astype(np.float32), DATA[1000:2500]])
    np.testing.assert_array_equal(found, brute_force(reference, QUERIES, 7))


def test_vector_source_reads_shards_rows_and_subsets():
    shards = [DATA[:100].astype(np.float16), DATA[100:250].astype(np.float16)]
    source = VectorSource(shards)
    joined = np.concatenate(shards).astype(np.float32)
    assert len(source) == 250 and source.dim == 32
    rows = np.array([[249, 0], [100, 99]])
    np.testing.assert_array_equal(source.take(rows), joined[rows])
    np.testing.assert_array_equal(source.take(np.array([-1]))[0], np.zeros(32, np.float32))
    np.testing.assert_array_equal(np.concatenate(list(source.chunks(64))), joined)
    assert [len(c) for c in source.chunks(64)] == [64, 64, 64, 58]  # blocks span the shard boundary
    subset = RowSubset(source, np.array([5, 200, 7]))
    np.testing.assert_array_equal(subset.all(), joined[[5, 200, 7]])
    np.testing.assert_array_equal(subset.take(np.array([2, 0])), joined[[7, 5]])
    assert len(source.sample(50)) == 50 and len(np.unique(source.sample(50), axis=0)) == 50


@pytest.mark.parametrize("index_type", ["ivf", "ivfsq"])
def test_memory_mapped_ivf_answers_like_the_loaded_one(tmp_path, built, index_type):
    _, index = built(index_type)
    path = tmp_path / "ivf.index"
    faiss.write_index(index, str(path))
    mapped = read_vector_index(str(path), mmap=True)
    assert "OnDisk" in type(faiss.downcast_InvertedLists(faiss.extract_index_ivf(mapped).invlists)).__name__
    knobs = SearchKnobs(nprobe=8)
    np.testing.assert_array_equal(search(mapped, QUERIES, 10, knobs)[1], search(index, QUERIES, 10, knobs)[1])


def test_a_refined_factory_index_is_read_with_its_codes_memory_mapped(tmp_path):
    index = build_vector_index(DATA, spec_for("IVF32,PQ8,Refine(SQfp16)", len(DATA), 32))
    path = tmp_path / "refined.index"
    faiss.write_index(index, str(path))
    mapped = read_vector_index(str(path), mmap=True)
    assert is_refined(mapped) and not faiss.downcast_index(faiss.downcast_index(mapped).refine_index).codes.is_owned
    knobs = SearchKnobs(nprobe=8, rerank_factor=10)
    np.testing.assert_array_equal(search(mapped, QUERIES, 10, knobs)[1], search(index, QUERIES, 10, knobs)[1])


def test_empty_copy_keeps_training():
    index = build_vector_index(DATA, spec_for("ivf", len(DATA), 32))
    copy = empty_copy(index)
    assert copy.ntotal == 0 and copy.is_trained
    copy.add(DATA[:10])
    assert copy.ntotal == 10


def test_drift_and_growth_trigger_retraining():
    spec = spec_for("ivf", len(DATA), 32)
    index = build_vector_index(DATA, spec)
    record = {
        "choice": {"spec": spec.to_json()},
        "trained": {"count": len(DATA), "mean_residual": mean_residual(index, DATA[:2000])},
    }
    alike = clustered(500, 32, seed=0)  # same centres, same spread
    assert needs_retraining(record, index, alike, len(DATA) + 500) is None
    elsewhere = clustered(500, 32, seed=7, spread=0.1)  # other centres: far from every list
    assert "farther" in needs_retraining(record, index, elsewhere, len(DATA) + 500)
    assert "grew" in needs_retraining(record, index, alike, 5 * len(DATA))
    flat = {"choice": {"spec": spec_for("flat", 10, 32).to_json()}, "trained": {}}
    assert needs_retraining(flat, build_vector_index(DATA, "flat"), elsewhere, 10**9) is None


def test_estimates_match_what_faiss_allocates(built):
    for index_type in ("flat", "ivf", "ivfsq", "ivfpq", "hnsw"):
        spec, index = built(index_type)
        stored = len(faiss.serialize_index(index))
        assert 0.6 * stored <= estimate_bytes(spec, len(DATA), 32) <= 2.0 * stored, index_type


# -- devices -------------------------------------------------------------------------------


def test_torch_exact_index_matches_faiss_on_cpu(monkeypatch):
    import retrieval.index.torch_search as torch_search

    monkeypatch.setattr(torch_search, "ROW_BLOCK", 1000)  # several row blocks merged
    index = TorchFlatIndex(VectorSource([DATA[:2500], DATA[2500:]]), device="cpu")
    assert index.ntotal == len(DATA) and index.d == 32
    scores, found = search(index, QUERIES, 10, exclude=Exclusions(np.array([0, 1]), len(DATA)))
    expected = brute_force(DATA, QUERIES, 10, np.array([0, 1]))
    np.testing.assert_array_equal(found, expected)


@pytest.mark.skipif(not torch_cuda_available(), reason="no CUDA device visible to torch")
def test_torch_float16_path_on_cuda_matches_faiss_cpu():
    index = TorchFlatIndex(DATA, device="cuda")
    _, found = search(index, QUERIES, 10)
    assert recall_at(found, brute_force(DATA, QUERIES, 10), 10) >= 0.99  # float16 storage may swap near-ties


@pytest.mark.skipif(gpu_count() == 0, reason="faiss has no GPU support here (faiss-cpu) or sees no GPU")
def test_faiss_gpu_indexes_match_the_cpu():
    for index_type in ("flat", "ivf", "ivfsq"):
        cpu = build_vector_index(DATA, spec_for(index_type, len(DATA), 32))
        gpu = to_available_gpus(cpu)
        knobs = SearchKnobs(nprobe=16)
        exclude = Exclusions(np.array([3]), len(DATA))
        assert (
            recall_at(search(gpu, QUERIES, 10, knobs, exclude)[1], search(cpu, QUERIES, 10, knobs, exclude)[1], 10)
            >= 0.99
        )


def test_shortlist_tuning_picks_the_fastest_setting_that_reaches_the_target():
    tried = []

    def attempt(knobs):  # recall grows with probes x shortlist; time with both
        tried.append((knobs.nprobe, knobs.rerank_factor))
        return knobs.nprobe * knobs.rerank_factor >= 160, knobs.nprobe + 0.3 * knobs.rerank_factor

    best = fastest_shortlist(SearchKnobs(nprobe=4, rerank_factor=40), 16.0, [1, 2, 4, 8, 16, 32, 64], attempt)
    assert (best.nprobe, best.rerank_factor) == (8, 20)
    assert (16, 4) in tried and (32, 4) not in tried  # a factor is not probed past the best time
