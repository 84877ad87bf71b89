"""The FAISS layer against brute-force numpy search."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.core.errors import InputError
from retrieval.index.spec import SearchKnobs
from retrieval.index.vector_index import build_vector_index, search


def _unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("n, d, k", [(1, 3, 1), (57, 17, 5), (300, 64, 10), (20, 8, 50)])
def test_flat_search_matches_brute_force(n, d, k):
    rng = np.random.default_rng(n + d)
    data, queries = _unit_rows(rng, n, d), _unit_rows(rng, 7, d)
    scores, positions = search(build_vector_index(data), queries, k)
    expected = queries @ data.T
    order = np.argsort(-expected, axis=1, kind="stable")[:, : min(k, n)]
    assert positions.shape == (7, min(k, n))
    np.testing.assert_allclose(scores, np.take_along_axis(expected, order, axis=1), atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(expected, positions, axis=1), scores, atol=1e-5)


def test_empty_index_returns_no_hits():
    scores, positions = search(build_vector_index(np.zeros((0, 4), np.float32)), np.ones((2, 4), np.float32), 5)
    assert scores.shape == (2, 0) and positions.shape == (2, 0)


def test_bad_input():
    index = build_vector_index(np.eye(4, dtype=np.float32))
    with pytest.raises(InputError, match="dimension 3"):
        search(index, np.ones((1, 3), np.float32), 1)
    with pytest.raises(InputError, match="2-D"):
        build_vector_index(np.ones(4, np.float32))
    with pytest.raises(InputError, match="unknown index type"):
        build_vector_index(np.eye(4, dtype=np.float32), "hnsw-typo")


def test_exact_index_over_duplicates_reports_full_recall():
    """40 identical rows (a template caption, one photo twice): the exact index finds some of them, which is exact."""
    from retrieval.index.recall import measure_and_tune
    from retrieval.index.source import VectorSource
    from retrieval.index.spec import spec_for

    rng = np.random.default_rng(3)
    data = np.concatenate([_unit_rows(rng, 2000, 32), np.repeat(_unit_rows(rng, 1, 32), 40, axis=0)])
    queries = np.concatenate([data[-1:] + 0.01 * _unit_rows(rng, 200, 32), _unit_rows(rng, 200, 32)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    spec = spec_for("flat", len(data), 32)
    report = measure_and_tune(
        build_vector_index(data, spec), spec, VectorSource(data), queries, "self", target_recall=0.95
    )
    assert report.recall_at_10 == 1.0 and report.recall_at_1 == 1.0 and report.target_reached  # ids alone: 0.61
    assert report.queries == 200 and report.tuning_queries == 200 and report.query_source == "self"


def test_an_index_of_one_kind_records_that_its_recall_comes_from_self_queries(
    tmp_path, tiny_clip_dir, small_collection
):
    from click.testing import CliRunner

    import retrieval
    from retrieval.cli.main import main

    choice = retrieval.EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")
    retrieval.build_index(
        captions=[small_collection / "captions.txt"],
        index=tmp_path / "c",
        encoders=choice,
        embed=retrieval.EmbedOptions(workers=0, progress=False),
    )
    measured = retrieval.open_index(tmp_path / "c").manifest["vector_indexes"]["clip/caption"]["measured"]
    assert (
        measured["query_source"] == "self"
        and measured["held_out"]
        and (measured["queries"], measured["tuning_queries"]) == (1, 1)
    )
    info = CliRunner().invoke(main, ["info", "--index", str(tmp_path / "c")])
    assert info.exit_code == 0 and "(1 queries: self)" in info.output, info.output


def test_a_memory_mapped_ivf_index_starts_no_prefetch_threads_and_answers_as_one_in_memory(tmp_path):
    """FAISS's on-disk IVF lists start prefetch threads on every search by default, which cost a single query
    many times its search (benchmarks/SERVE.md). Read with mmap, they prefetch on none."""
    import faiss

    from retrieval.index.spec import spec_for
    from retrieval.index.vector_index import read_vector_index

    data = _unit_rows(np.random.default_rng(5), 20_000, 32)
    index = build_vector_index(data, spec_for("IVF128,Flat", len(data), 32))
    faiss.write_index(index, str(tmp_path / "ivf.index"))
    mapped, loaded = (
        read_vector_index(tmp_path / "ivf.index", mmap=True),
        read_vector_index(tmp_path / "ivf.index", mmap=False),
    )
    assert (
        type(faiss.downcast_InvertedLists(mapped.invlists)).__name__ == "OnDiskInvertedLists"
    )  # what the check is about
    assert faiss.downcast_InvertedLists(mapped.invlists).prefetch_nthread == 0
    queries = data[:200]
    knobs = SearchKnobs(nprobe=8)
    assert np.array_equal(search(mapped, queries, 10, knobs)[1], search(loaded, queries, 10, knobs)[1])
    assert np.array_equal(search(mapped, queries[:1], 10, knobs)[1], search(loaded, queries[:1], 10, knobs)[1])


@pytest.mark.parametrize("n, expected", [(100, "flat"), (255, "flat"), (256, "ivfpq")])
def test_ivfpq_on_too_few_vectors_for_its_codebooks_is_exact_search(n, expected):
    from retrieval.core.config import IndexOptions
    from retrieval.index.spec import spec_for
    from retrieval.index.vector_sets import choose

    vectors = np.random.default_rng(3).standard_normal((n, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    choice = choose(IndexOptions(index_type="ivfpq"), n, 32, None)
    assert choice.spec.type == expected
    index = build_vector_index(vectors, choice.spec)  # FAISS refused PQ training on fewer than 256 points
    assert search(index, vectors[:3], 1, SearchKnobs(nprobe=choice.spec.nlist or 1))[1][:, 0].tolist() == [0, 1, 2]
    if n < 256:
        with pytest.raises(InputError, match="at least 256 vectors"):
            spec_for("ivfpq", n, 32)
