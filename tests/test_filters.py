"""``where=`` filters inside the search, against numpy brute force over the allowed rows; cutoffs and paging."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

import retrieval
import retrieval.index.selection as selection_module
from retrieval.api.filters import FilterCache, evaluate, filter_table
from retrieval.api.write import WriteOptions, write_index
from retrieval.asif.anchors import AnchorSet, AnchorSpaces
from retrieval.asif.relative import AsifParams, SparseRelativeIndex
from retrieval.cli import main
from retrieval.core.config import IndexOptions
from retrieval.core.errors import InputError
from retrieval.embed.embedded import EmbeddedItems
from retrieval.embed.pipeline import ImageRow
from retrieval.index.recall import RECALL_QUERIES, measure_and_tune
from retrieval.index.selection import (
    Selection,
    exact_first,
    exact_scan,
    restrict,
    search_selected,
    widened,
)
from retrieval.index.source import VectorSource
from retrieval.index.spec import SearchKnobs, spec_for
from retrieval.index.torch_search import TorchFlatIndex, torch_cuda_available
from retrieval.index.vector_index import Exclusions, build_vector_index, own_knobs
from retrieval.sources.items import CaptionRecord, ImageRef

K = 10
SHARES = (0.5, 0.1, 0.01, 0.001)


def clustered(n: int, d: int, seed: int = 0, clusters: int = 50, spread: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = (centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(
    data: np.ndarray, queries: np.ndarray, allowed: np.ndarray, k: int = K
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over the allowed rows only: descending score, ties by lower position."""
    scores = queries @ data[allowed].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), allowed[order]


def allowed_at(share: float, n: int, seed: int = 3) -> np.ndarray:
    """A random set of about ``share`` of ``n`` rows (at least one)."""
    rng = np.random.default_rng(seed)
    picked = np.flatnonzero(rng.random(n) < share)
    return picked if len(picked) else np.array([int(rng.integers(n))])


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


DATA = clustered(10_000, 32)
QUERIES = clustered(60, 32, seed=1)
TUNING = clustered(RECALL_QUERIES, 32, seed=2)
SOURCE = VectorSource(DATA.astype(np.float16))
STORED = SOURCE.all()  # what the exact scan reads: the stored float16 rows


@pytest.fixture(scope="module")
def built():
    """(index, knobs tuned to recall@10 0.95 unfiltered as a build tunes them, re-ranking source) per type."""
    cache = {}

    def get(index_type):
        if index_type not in cache:
            spec = spec_for(index_type, len(DATA), DATA.shape[1])
            index = build_vector_index(SOURCE, spec)
            knobs = SearchKnobs() if spec.exact else measure_and_tune(index, spec, SOURCE, TUNING, "self", 0.95).knobs
            cache[index_type] = (index, knobs, SOURCE if spec.rerank else None)
        return cache[index_type]

    return get


def _check_filtered(built: tuple, share: float, min_recall: float = 1.0) -> None:
    index, knobs, rerank_with = built
    allowed = allowed_at(share, len(DATA))
    selection = Selection(allowed, len(DATA))
    scores, positions = search_selected(index, QUERIES, K, knobs, selection, SOURCE, rerank_with)
    want = min(K, len(allowed))
    assert positions.shape == (len(QUERIES), want)  # k whenever k pass: never fetched-then-dropped short
    assert np.isin(positions, allowed).all()
    _, truth = brute_force(STORED, QUERIES, allowed, want)
    assert recall(positions, truth) >= min_recall, (share, recall(positions, truth))


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("index_type", ["flat", "ivf", "ivfpq", "hnsw"])
def test_filtered_search_matches_brute_force_at_every_selectivity(built, index_type, share):
    """The default rule: exact below the border, the selector path (recall near the unfiltered 0.95) above it."""
    exact = exact_first(built(index_type)[0], Selection(allowed_at(share, len(DATA)), len(DATA)))
    assert exact == (share <= 0.1)  # 50% of 10,000 rows: the selector; 1,000 rows and fewer: the exact scan
    _check_filtered(built(index_type), share, min_recall=1.0 if exact or index_type == "flat" else 0.9)


@pytest.mark.parametrize("share", [0.5, 0.1, 0.01])
@pytest.mark.parametrize("index_type", ["flat", "ivf", "ivfpq", "hnsw"])
def test_the_faiss_selector_path_finds_the_allowed_neighbours(built, index_type, share, monkeypatch):
    """Forced onto FAISS with the bitmap selector (what large collections take above 2%): k allowed hits, recall
    kept."""
    monkeypatch.setattr(selection_module, "EXACT_ROWS", 0)
    monkeypatch.setattr(selection_module, "EXACT_SHARE", 0.0)
    assert not exact_first(built(index_type)[0], Selection(allowed_at(share, len(DATA)), len(DATA)))
    _check_filtered(built(index_type), share, min_recall=1.0 if index_type == "flat" else 0.9)


def test_the_rule_scans_few_rows_exactly_and_leaves_many_to_the_index(built):
    index = built("hnsw")[0]
    assert exact_first(index, Selection(np.arange(5), 10_000))
    big = 100 * selection_module.EXACT_ROWS
    assert not exact_first(index, Selection(np.arange(big // 10), big))  # 10% of a large collection: the selector
    assert exact_first(index, Selection(np.arange(big // 100), big))  # 1%: the exact scan
    assert exact_first(
        index, Selection(np.arange(selection_module.EXACT_ROWS), 10**9)
    )  # few rows: exact, whatever the share


def test_deleted_rows_stay_out_of_a_filtered_search(built):
    allowed = allowed_at(0.1, len(DATA))
    deleted = allowed[::2]
    selection = restrict(allowed, len(DATA), Exclusions(deleted, len(DATA)))
    assert not np.isin(selection.positions, deleted).any() and len(selection) == len(allowed) - len(deleted)
    for index_type in ("flat", "hnsw"):
        _, positions = search_selected(built(index_type)[0], QUERIES, K, SearchKnobs(), selection, SOURCE)
        _, truth = brute_force(STORED, QUERIES, selection.positions)
        assert np.array_equal(positions, truth)


def test_the_torch_index_masks_before_its_top_k(monkeypatch):
    monkeypatch.setattr(selection_module, "EXACT_ROWS", 0)
    monkeypatch.setattr(selection_module, "EXACT_SHARE", 0.0)
    index = TorchFlatIndex(STORED, device="cpu")
    for share in SHARES:
        allowed = allowed_at(share, len(DATA))
        selection = Selection(allowed, len(DATA))
        assert not exact_first(index, selection)
        _, positions = search_selected(index, QUERIES, K, SearchKnobs(), selection, SOURCE)
        _, truth = brute_force(STORED, QUERIES, allowed, min(K, len(allowed)))
        assert positions.shape == truth.shape and recall(positions, truth) == 1.0


@pytest.mark.skipif(not torch_cuda_available(), reason="needs a CUDA device")
def test_the_torch_index_masks_on_cuda(monkeypatch):
    monkeypatch.setattr(selection_module, "EXACT_ROWS", 0)
    monkeypatch.setattr(selection_module, "EXACT_SHARE", 0.0)
    index = TorchFlatIndex(STORED, device="cuda")  # float16 on the device
    for share in SHARES:
        allowed = allowed_at(share, len(DATA))
        _, positions = search_selected(index, QUERIES, K, SearchKnobs(), Selection(allowed, len(DATA)), SOURCE)
        _, truth = brute_force(STORED, QUERIES, allowed, min(K, len(allowed)))
        assert positions.shape == truth.shape and np.isin(positions, allowed).all() and recall(positions, truth) >= 0.95


def test_widening_raises_probes_and_breadth_with_the_share(built):
    ivf, hnsw = built("ivf")[0], built("hnsw")[0]
    assert (
        widened(ivf, SearchKnobs(nprobe=4), 0.5).nprobe == 6 and widened(ivf, SearchKnobs(nprobe=4), 0.01).nprobe == 40
    )
    assert widened(hnsw, SearchKnobs(ef_search=16), 0.04).ef_search == 80
    assert widened(built("ivfpq")[0], SearchKnobs(), 0.25).nprobe == 2 * own_knobs(built("ivfpq")[0]).nprobe
    assert widened(ivf, SearchKnobs(nprobe=4), 1.0) == SearchKnobs(nprobe=4)


def test_exact_scan_breaks_ties_by_lower_position():
    rows = np.tile(np.eye(4, dtype=np.float32)[:1], (6, 1))  # six identical rows
    positions = np.array([3, 8, 11, 20, 21, 40])
    scores, found = exact_scan(np.eye(4, dtype=np.float32)[:1], rows, positions, 3)
    assert found.tolist() == [[3, 8, 11]] and scores.tolist() == [[1.0, 1.0, 1.0]]


@pytest.mark.parametrize("share", SHARES)
def test_sparse_asif_search_is_restricted_to_the_allowed_rows(share):
    import scipy.sparse as sp

    rng = np.random.default_rng(4)
    rows = sp.random(5000, 64, density=0.1, random_state=5, format="csr", dtype=np.float32)
    queries = sp.random(20, 64, density=0.2, random_state=6, format="csr", dtype=np.float32)
    allowed = np.sort(rng.choice(5000, size=max(1, int(share * 5000)), replace=False))
    scores, positions = SparseRelativeIndex(rows, values="float32").search(queries, K, allowed=allowed)
    dense = (queries @ rows.T).toarray()
    truth_scores, truth = brute_force(
        np.eye(5000, dtype=np.float32), dense.astype(np.float32), allowed, min(K, len(allowed))
    )
    assert positions.shape == truth.shape and np.isin(positions, allowed).all()
    assert np.allclose(scores, np.take_along_axis(dense, positions, axis=1), atol=1e-6)
    assert np.allclose(scores, truth_scores, atol=1e-6)


# -- the predicate ------------------------------------------------------------------------------


def _items() -> pa.Table:
    return pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "uri": ["/p/2024/a.jpg", "/p/2023/b.jpg", "/p/2024/c.jpg", "/q/d.jpg"],
            "width": pa.array([1200, 800, 1000, 640], pa.int32()),
            "label": ["cat", "dog", "bird", None],
            "metadata": [
                '{"url": "http://x/a", "status": "success"}',
                None,
                '{"url": "http://y/c", "n": 3}',
                '{"n": "odd"}',
            ],
        }
    )


@pytest.mark.parametrize(
    "predicate, expected",
    [
        ("uri GLOB '*/2024/*' AND width >= 1000", [0, 2]),
        ("label IN ('cat', 'dog')", [0, 1]),
        ("url LIKE 'http://y/%'", [2]),  # a metadata field by its own name
        ("metadata.status = 'success'", [0]),  # or through the metadata struct
        ("n = '3'", [2]),  # a field of mixed types is text
        ("label IS NULL", [3]),
    ],
)
def test_predicates_over_item_columns_and_metadata(predicate, expected):
    assert evaluate(filter_table(_items()), predicate).tolist() == expected


def test_metadata_names_that_clash_in_sql_are_kept_apart():
    """SQL names ignore case: a field named like an item column stays under metadata, case twins keep one."""
    table = pa.table(
        {"id": ["a", "b"], "label": ["x", None], "metadata": ['{"Label": "L", "URL": "U", "url": "u", "": 1}', None]}
    )
    view = filter_table(table)
    assert view.column_names == ["id", "label", "position", "metadata", "URL"]
    assert evaluate(view, "label = 'x'").tolist() == [0] and evaluate(view, "metadata.label = 'L'").tolist() == [0]
    assert evaluate(view, "url = 'U'").tolist() == [0]
    no_metadata = pa.table({"id": ["a"], "label": ["x"], "metadata": pa.array([None], pa.string())})
    assert evaluate(filter_table(no_metadata), "label = 'x' AND metadata IS NULL").tolist() == [0]


@pytest.mark.parametrize(
    "predicate, message",
    [
        ("colour = 'red'", 'column "colour" not found'),
        ("width >", "syntax error"),
        ("added > DATE '2024-01-01'", "no column 'added' in this index"),
        ("", "empty"),
    ],
)
def test_a_bad_predicate_is_one_line_naming_the_problem(predicate, message):
    with pytest.raises(InputError, match=message) as caught:
        evaluate(filter_table(_items()), predicate)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "attack",
    [
        "1=1) UNION SELECT 1 FROM read_csv('/etc/passwd'",
        "true) UNION ALL (SELECT 99",
        "(SELECT count(*) FROM read_text('/etc/passwd')) > 0",
        "1=1; SELECT 1",
        "uri IN (SELECT * FROM glob('/*'))",
    ],
)
def test_injection_is_refused(attack):
    with pytest.raises(InputError):
        evaluate(filter_table(_items()), attack)


def test_a_runaway_predicate_is_interrupted(monkeypatch):
    import retrieval.api.filters as filters

    monkeypatch.setattr(filters, "FILTER_SECONDS", 0.5)
    with pytest.raises(InputError, match="still running after 0.5 s"):
        evaluate(filter_table(_items()), "(SELECT count(*) FROM range(10000000000000) t(x) WHERE x % 7 = 3) > 0")


def test_each_predicate_is_evaluated_once(monkeypatch):
    import retrieval.api.filters as filters

    calls = []
    real = filters.evaluate
    monkeypatch.setattr(filters, "evaluate", lambda *args: calls.append(args[1]) or real(*args))
    cache = FilterCache(lambda kind: _items(), lambda kind, positions: positions, size=2)
    for _ in range(3):
        assert cache.get("image", "width > 900").tolist() == [0, 2]
    assert calls == ["width > 900"]
    cache.get("image", "width > 1"), cache.get("image", "width > 2"), cache.get("image", "width > 900")
    assert calls == ["width > 900", "width > 1", "width > 2", "width > 900"]  # the oldest fell out of the LRU


# -- through the Index: ASIF (both routes, unimodal) and CLIP ------------------------------------


def _unit(rows: int, dim: int, seed: int) -> np.ndarray:
    return clustered(rows, dim, seed=seed, clusters=20)


N_ITEMS = 2000


def _embedded(dim: int, shared: bool, record: dict) -> EmbeddedItems:
    images = [
        ImageRow(
            ImageRef(
                uri=f"shard-0.tar#{n:05d}.jpg",
                opener=bytes,
                source="shard-0.tar",
                label=f"l{n % 7}",
                metadata={"n": n, "url": f"http://example.com/{n}.jpg"},
            ),
            100 + n,
            50,
            None,
        )
        for n in range(N_ITEMS)
    ]
    captions = [
        CaptionRecord(text=f"caption {n}", source="captions.parquet", row=n, metadata={"n": n}) for n in range(300)
    ]
    return EmbeddedItems(
        images=images,
        image_vectors=_unit(N_ITEMS, dim, 1),
        captions=captions,
        caption_vectors=_unit(300, dim, 2),
        encoders={"image": record, "text": record},
        shared_space=shared,
    )


@pytest.fixture(scope="module")
def asif_index(tmp_path_factory):
    dim = 16
    record = {"spec": "precomputed:test", "dim": dim, "fingerprint": "0123456789abcdef"}
    anchors = AnchorSet(
        "random", _unit(64, dim, 3), _unit(64, dim, 4), [f"anchor {n}" for n in range(64)], record, record
    )
    options = WriteOptions(
        anchors=AnchorSpaces([anchors]),
        asif=AsifParams(k=8, p=2.0),
        progress=False,
        index_options=IndexOptions(index_type="hnsw"),
    )
    path = write_index(_embedded(dim, False, record), tmp_path_factory.mktemp("filters") / "asif", options)
    return retrieval.open_index(path, device="cpu")


WHERE = {0.5: "n % 2 = 0", 0.1: "n % 10 = 0", 0.01: "n % 100 = 0", 0.001: "n % 1000 = 0"}


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("route", ["asif", "projected", "unimodal"])
def test_index_where_matches_brute_force_on_every_asif_route(asif_index, route, share):
    where = WHERE[share]
    allowed = asif_index.matching("image", where)
    assert allowed.tolist() == list(range(0, N_ITEMS, round(1 / share)))
    modality = "image" if route == "unimodal" else "text"
    queries = _unit(12, 16, 9)
    scores, positions = asif_index.search_vectors(
        "image", queries, modality, K, retrieval.SearchOptions(route=route, where=where)
    )
    if route == "asif":
        rows = asif_index.relative_index("image").rows.toarray()
        relative = asif_index.anchor_spaces.relative(queries, "text", asif_index.asif_params).toarray()
        truth_scores, truth = brute_force(rows, relative.astype(np.float32), allowed, min(K, len(allowed)))
    else:
        key = "projected/image" if route == "projected" else "image/image"
        truth_scores, truth = brute_force(asif_index.vector_source(key).all(), queries, allowed, min(K, len(allowed)))
    assert positions.shape == truth.shape and np.array_equal(positions, truth)
    assert np.allclose(scores, truth_scores, atol=1e-5)


def test_hits_obey_the_where_clause_and_deleted_items_stay_out(asif_index, tmp_path):
    copy = retrieval.open_index(shutil.copytree(asif_index.path, tmp_path / "copy"), device="cpu")
    gone = copy.items("image")["id"][20]
    retrieval.remove_from_index(copy.path, ids=[gone])
    reopened = retrieval.open_index(copy.path, device="cpu")
    assert 20 not in reopened.matching("image", "n % 10 = 0").tolist()
    _, positions = reopened.search_vectors(
        "image", _unit(5, 16, 9), "text", 300, retrieval.SearchOptions(route="projected", where="n % 10 = 0")
    )
    assert positions.shape == (5, 199) and 20 not in positions
    options = retrieval.SearchOptions(route="asif", where="label = 'l3' AND width >= 1000")
    hits = reopened.search_vectors("image", _unit(1, 16, 9), "text", 5, options)[1][0]
    assert all(n % 7 == 3 and 100 + n >= 1000 for n in hits.tolist())


def test_where_on_captions_and_unknown_columns(asif_index):
    assert asif_index.matching("caption", "caption LIKE 'caption 1_'").tolist() == list(range(10, 20))
    with pytest.raises(InputError, match='"width" not found'):
        asif_index.matching("caption", "width > 3")
    assert len(asif_index.matching("image", "added = current_date")) == N_ITEMS  # written today
    assert len(asif_index.matching("image", "added < DATE '2024-01-01' OR added > current_date")) == 0
    assert (
        asif_index.items("image")["added"][0] == datetime.now(timezone.utc).date().isoformat()
    )  # ISO text: plain JSON


# -- min_score, offset and ties, through a CLIP index (text queries) --------------------------------


@pytest.fixture(scope="module")
def clip_index(tmp_path_factory, tiny_clip_dir):
    from large_index import make_large_index

    path = make_large_index(
        tmp_path_factory.mktemp("filters-clip") / "clip", tiny_clip_dir, images=400, captions=40, index_type="flat"
    )
    return retrieval.open_index(path, device="cpu")


def test_offset_pages_through_a_bigger_query(clip_index):
    whole = clip_index.text_to_image("a photo", k=30)
    pages = [
        clip_index.text_to_image("a photo", k=10, options=retrieval.SearchOptions(offset=offset))
        for offset in (0, 10, 20)
    ]
    assert [hit for page in pages for hit in page] == whole
    assert [hit.rank for hit in pages[1]] == list(range(11, 21))
    where = "uri GLOB '*/0000[0-9][0-9].jpg'"
    filtered = clip_index.text_to_image("a photo", k=20, options=retrieval.SearchOptions(where=where))
    paged = clip_index.text_to_image("a photo", k=10, options=retrieval.SearchOptions(where=where, offset=10))
    assert paged == filtered[10:]


def test_min_score_drops_weaker_hits(clip_index):
    hits = clip_index.text_to_image("a photo", k=20)
    cut = hits[7].score
    kept = clip_index.text_to_image("a photo", k=20, options=retrieval.SearchOptions(min_score=cut))
    assert kept == [hit for hit in hits if hit.score >= cut] and len(kept) >= 8
    with pytest.raises(InputError, match="`SearchOptions.offset` must be an integer >= 0, got -1"):
        retrieval.SearchOptions(offset=-1)
    with pytest.raises(InputError, match="`SearchOptions.min_score` must be a finite number"):
        retrieval.SearchOptions(min_score=float("nan"))
    with pytest.raises(InputError, match="`options` must be a SearchOptions"):
        clip_index.text_to_image("a photo", options={"min_score": 0.5})


def test_ties_are_ordered_by_id():
    """Hits of equal score come in id order, whatever order the search returned them in."""
    from retrieval.api.routes import caption_hits, image_hits

    table = {"id": ["c", "a", "b"], "uri": ["u"] * 3, "width": [1] * 3, "height": [1] * 3}
    hits = image_hits(table, np.array([[0.5, 0.5, 0.9]]), np.array([[0, 1, 2]]))[0]
    assert [hit.id for hit in hits] == ["b", "a", "c"]
    captions = {"id": ["z", "y"], "caption": ["x", "x"], "source": ["s", "s"], "image_uri": [None, None]}
    assert [hit.id for hit in caption_hits(captions, np.array([[0.3, 0.3]]), np.array([[0, 1]]))[0]] == ["y", "z"]


def test_cli_where_min_score_and_offset(clip_index):
    runner = CliRunner()
    args = ["text-to-image", "a photo", "--index", str(clip_index.path), "--device", "cpu", "-k", "5", "--json"]
    result = runner.invoke(main, args + ["--where", "uri GLOB '*/00001[0-9].jpg'"])
    assert result.exit_code == 0, result.output
    uris = [json.loads(line)["uri"] for line in result.output.splitlines()]
    assert len(uris) == 5 and all(uri.endswith(tuple(f"/00001{d}.jpg" for d in range(10))) for uri in uris)
    expected = [
        hit.uri
        for hit in clip_index.text_to_image(
            "a photo", k=5, options=retrieval.SearchOptions(where="uri GLOB '*/00001[0-9].jpg'")
        )
    ]
    assert uris == expected

    everything = [hit.score for hit in clip_index.text_to_image("a photo", k=10)]
    result = runner.invoke(main, args + ["--min-score", str(everything[2]), "--offset", "1"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["passed"] == len(record["hits"]) == 2 and [hit["rank"] for hit in record["hits"]] == [2, 3]

    result = runner.invoke(main, args + ["--where", "colour = 'red'"])
    assert (
        result.exit_code == 2
        and 'column "colour" not found' in result.output
        and len(result.output.strip().splitlines()) == 1
    )
    result = runner.invoke(main, args + ["--where", "1=1) UNION SELECT 1 FROM read_csv('/etc/passwd'"])
    assert result.exit_code == 2 and "syntax error" in result.output
    result = runner.invoke(main, args + ["--min-score", "nan"])  # the library's `SearchOptions.min_score`, as a flag
    assert result.exit_code == 2 and "Error: --min-score must be a finite number, got nan" in result.output
    assert "SearchOptions" not in result.output
