"""One IVF index from many parts, and sharded search, in this process (no Ray): issue 15 sections 2 and 3.

The Ray side (parts filled by Ray tasks, shards searched by Ray actors) is in test_ray_index.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from large_index import caption_items, clustered_vectors, image_rows, tiny_clip_record

from retrieval.core.search import SearchKnobs, SearchOptions

N = 2000


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered_vectors(3000, 32, seed=3)[0]


def _lists(index) -> list[tuple[list[int], bytes]]:
    import faiss
    from faiss.contrib.inspect_tools import get_invlist

    lists = faiss.extract_index_ivf(index).invlists
    return [(get_invlist(lists, n)[0].tolist(), get_invlist(lists, n)[1].tobytes()) for n in range(lists.nlist)]


@pytest.fixture(scope="module")
def ivfpq(vectors):
    from retrieval.index.spec import spec_for
    from retrieval.index.vector_index import build_vector_index

    return build_vector_index(vectors, spec_for("ivfpq", len(vectors), vectors.shape[1]))


@pytest.mark.parametrize("index_type", ["ivf", "ivfsq", "ivfpq"])
def test_parts_merged_in_memory_are_the_single_machine_index(vectors, ivfpq, index_type):
    from retrieval.index.ivf_lists import fill_range, merge_in_ram, shard_bounds
    from retrieval.index.spec import spec_for
    from retrieval.index.vector_index import (
        build_vector_index,
        empty_copy,
        search,
        train_vector_index,
    )

    spec = spec_for(index_type, len(vectors), vectors.shape[1])
    single = ivfpq if index_type == "ivfpq" else build_vector_index(vectors, spec)
    # the Ray build trains with train_vector_index on the same sample, so the same quantizer (checked for the
    # cheap types; OPQ+PQ training takes a minute here, so ivfpq reuses the trained index)
    trained = empty_copy(single) if index_type == "ivfpq" else train_vector_index(vectors, spec)
    parts = [fill_range(trained, vectors[low:high], low) for low, high in shard_bounds(len(vectors), 3)]
    merged = merge_in_ram(trained, parts)
    assert merged.ntotal == single.ntotal == len(vectors)
    assert _lists(merged) == _lists(single)  # same ids, in the same order, with the same codes in every list
    for nprobe in (1, 4):
        knobs = SearchKnobs(nprobe=nprobe)
        a, b = search(single, vectors[:50], 10, knobs), search(merged, vectors[:50], 10, knobs)
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])


def test_lists_merged_on_disk_search_after_the_folder_moves(vectors, tmp_path, capfd):
    import faiss

    from retrieval.core.errors import IndexFormatError
    from retrieval.index.ivf_lists import (
        fill_range,
        merge_on_disk,
        read_ondisk_index,
        shard_bounds,
    )
    from retrieval.index.spec import spec_for
    from retrieval.index.vector_index import (
        build_vector_index,
        search,
        train_vector_index,
    )

    spec = spec_for("ivfsq", len(vectors), vectors.shape[1])
    single = build_vector_index(vectors, spec)
    trained = train_vector_index(vectors, spec)
    paths = []
    for number, (low, high) in enumerate(shard_bounds(len(vectors), 4)):
        paths.append(tmp_path / f"part-{number}.index")
        faiss.write_index(fill_range(trained, vectors[low:high], low), str(paths[-1]))
    (tmp_path / "a").mkdir()
    merged = merge_on_disk(trained, paths, tmp_path / "a" / "lists.ivfdata")
    faiss.write_index(merged, str(tmp_path / "a" / "index.faiss"))
    del merged
    shutil.move(tmp_path / "a", tmp_path / "b")  # the .index file recorded a/lists.ivfdata
    capfd.readouterr()
    knobs = SearchKnobs(nprobe=8)
    expected = search(single, vectors[:40], 10, knobs)
    for in_memory in (False, True):
        moved = read_ondisk_index(tmp_path / "b" / "index.faiss", tmp_path / "b" / "lists.ivfdata", in_memory=in_memory)
        found = search(moved, vectors[:40], 10, knobs)
        assert np.array_equal(found[1], expected[1]) and np.array_equal(found[0], expected[0])
    printed = capfd.readouterr()  # FAISS's printf notice goes to stderr, never into a --json stdout
    assert "updating ondisk filename" not in printed.out and "updating ondisk filename" in printed.err
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    with open(tmp_path / "c" / "lists.ivfdata", "r+b") as handle:  # lists cut short: FAISS would map past the end
        handle.truncate(1000)
    with pytest.raises(IndexFormatError, match="1000 bytes, its index says"):
        read_ondisk_index(tmp_path / "c" / "index.faiss", tmp_path / "c" / "lists.ivfdata")


def test_sharded_search_merges_ties_by_id_and_leaves_out_deleted_rows():
    from retrieval.index.ivf_lists import split_index
    from retrieval.index.sharded import ShardedIndex, ShardRange
    from retrieval.index.vector_index import Exclusions, build_vector_index

    rng = np.random.default_rng(0)
    base = unit(rng.standard_normal((4, 16)))
    rows = np.concatenate([base, base, base])  # rows i, i + 4 and i + 8 are the same vector
    bounds = [(0, 5), (5, 9), (9, 12)]
    sharded = ShardedIndex(split_index(build_vector_index(rows, "flat"), bounds), [ShardRange(*b) for b in bounds])
    _, positions = sharded.search(base[:1], 3)
    assert positions.tolist() == [[0, 4, 8]]  # equal scores: smaller ids first, across shards
    _, positions = sharded.search(base[:1], 3, exclude=Exclusions(np.array([4, 0]), 12))
    assert positions[0].tolist()[:1] == [8] and 0 not in positions and 4 not in positions
    _, positions = sharded.search(base[:1], 20, exclude=Exclusions(np.array([4, 0]), 12))
    assert positions.shape == (1, 10)  # k is cut to the live rows


def test_sharded_ivfpq_reranks_the_union_of_the_shards_shortlists(vectors, ivfpq):
    """ivfpq: each shard's shortlist of k x rerank_factor, together a superset of the whole index's: as good or
    better."""
    from retrieval.index.ivf_lists import shard_bounds, split_index
    from retrieval.index.sharded import ShardedIndex, ShardRange
    from retrieval.index.source import VectorSource
    from retrieval.index.vector_index import search

    stored = VectorSource(vectors.astype(np.float16))
    whole = ivfpq
    bounds = shard_bounds(len(vectors), 3)
    sharded = ShardedIndex(split_index(whole, bounds), [ShardRange(*b) for b in bounds])
    queries = vectors[::61] + 0.01
    for knobs in (SearchKnobs(nprobe=2, rerank_factor=2), SearchKnobs(nprobe=8, rerank_factor=4)):
        a_scores, a = search(whole, queries, 10, knobs, rerank_with=stored)
        b_scores, b = sharded.search(queries, 10, knobs, rerank_with=stored)
        assert (b_scores >= a_scores - 1e-5).all()
        assert np.array_equal(b_scores, np.sort(b_scores, axis=1)[:, ::-1])  # exact scores, best first


def test_auto_never_picks_a_graph_and_hnsw_cannot_be_sharded():
    from retrieval.core.config import IndexOptions
    from retrieval.core.errors import InputError
    from retrieval.index.spec import choose_index
    from retrieval.index.vector_sets import VectorSet, build_searchable

    # by hand: exact below 50,000 vectors; else IVF over float16 vectors (n x 512 x 2 bytes) when that fits the
    # budget; else PQ codes. Never a graph, which could not be split into shards.
    gb = 1 << 30
    expected = {
        (100, None): "flat", (100, gb): "flat", (100, 8 * gb): "flat",
        (60_000, None): "ivfsq", (60_000, gb): "ivfsq", (60_000, 8 * gb): "ivfsq",
        (2_000_000, None): "ivfsq", (2_000_000, gb): "ivfpq", (2_000_000, 8 * gb): "ivfsq",
        (50_000_000, None): "ivfsq", (50_000_000, gb): "ivfpq", (50_000_000, 8 * gb): "ivfpq",
    }  # fmt: skip
    chosen = {(n, budget): choose_index(n, 512, budget).spec.type for n, budget in expected}
    assert chosen == expected
    rows = unit(np.random.default_rng(1).standard_normal((200, 16)))
    with pytest.raises(InputError, match="HNSW graph cannot be split"):
        build_searchable(VectorSet("clip/image", rows, rows[:10], "self"), IndexOptions("hnsw", shards=2), None)


def _write(path: Path, record: dict, vectors: np.ndarray, clusters: np.ndarray, index_type: str, shards: int = 1):
    from retrieval.api.write import WriteOptions, write_index
    from retrieval.core.config import IndexOptions
    from retrieval.embed.embedded import EmbeddedItems

    rows = image_rows(path.parent / f"{path.name}-files", clusters)
    records, caption_vectors = caption_items(rows, vectors, clusters, 120)
    embedded = EmbeddedItems(
        images=rows,
        image_vectors=vectors,
        captions=records,
        caption_vectors=caption_vectors,
        encoders={"image": record, "text": record},
        shared_space=True,
    )
    options = WriteOptions(index_options=IndexOptions(index_type=index_type, shards=shards), progress=False)
    return write_index(embedded, path, options)


@pytest.fixture(scope="module")
def collection(tiny_clip_dir):
    record = tiny_clip_record(tiny_clip_dir)
    vectors, clusters = clustered_vectors(N, int(record["dim"]), seed=5)
    return record, vectors, clusters


def _search(index, queries: np.ndarray, nprobe: int | None = None, k: int = 10):
    return index.search_vectors("image", queries, "image", k, SearchOptions(knobs=SearchKnobs(nprobe=nprobe)))


@pytest.mark.parametrize("index_type", ["flat", "ivf"])
def test_a_sharded_index_answers_as_the_whole_one(collection, tmp_path, index_type):
    from retrieval.api.engine import open_index
    from retrieval.api.update import remove_from_index
    from retrieval.core.errors import InputError
    from retrieval.index.sharded import ShardedIndex

    record, vectors, clusters = collection
    _write(tmp_path / "whole", record, vectors, clusters, index_type)
    _write(tmp_path / "sharded", record, vectors, clusters, index_type, shards=3)
    manifest = json.loads((tmp_path / "sharded" / "manifest.json").read_text())
    assert manifest["vector_indexes"]["clip/image"]["shards"] == [[0, 666], [666, 1333], [1333, 2000]]
    assert len(manifest["files"]["faiss_shards"]["clip/image"]) == 3 and "clip/image" not in manifest["files"]["faiss"]
    assert all(rel in manifest["checksums"] for rel in manifest["files"]["faiss_shards"]["clip/image"])
    shutil.move(tmp_path / "sharded", tmp_path / "moved")  # shards are found relative to the directory
    whole, sharded = open_index(tmp_path / "whole", device="cpu"), open_index(tmp_path / "moved", device="cpu")
    assert isinstance(sharded.vector_index("clip/image"), ShardedIndex)
    queries = vectors[::97]
    for nprobe in (None,) if index_type == "flat" else (1, 3, 16):  # IVF: the same nprobe in every shard
        (a_scores, a), (b_scores, b) = _search(whole, queries, nprobe), _search(sharded, queries, nprobe)
        assert np.array_equal(a, b)
        np.testing.assert_allclose(a_scores, b_scores, rtol=0, atol=1e-6)
    where = "uri LIKE '%1.jpg' OR uri LIKE '%7.jpg'"  # a filter: the allowed rows, scanned exactly in each
    allowed = np.array(sharded.matching("image", where))
    assert 0 < len(allowed) < len(vectors) // 4
    scores, positions = sharded.search_vectors("image", queries, "image", 10, SearchOptions(where=where))
    reference = queries @ vectors[allowed].T
    order = np.argsort(-reference, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(
        scores, np.take_along_axis(reference, order, axis=1), atol=2e-3
    )  # stored rows are float16
    assert set(positions.ravel()) <= set(allowed.tolist())
    with pytest.raises(InputError, match="index shards"):
        remove_from_index(tmp_path / "moved", ids=[whole.items("image")["id"][0]])


def test_a_build_with_lists_merged_on_disk_checksums_them_and_moves(collection, tmp_path, monkeypatch):
    """The write stage's distributed path with its parts filled here (Ray fills them in test_ray_index.py)."""
    import faiss

    from retrieval.api import write
    from retrieval.api.engine import open_index
    from retrieval.api.update import remove_from_index
    from retrieval.core.errors import InputError
    from retrieval.index.ivf_lists import fill_range, has_ondisk_lists, shard_bounds
    from retrieval.index.ray_shards import RayIndexBuild

    class HereParts(RayIndexBuild):
        def fill_parts(self, name, trained, source):
            folder = self.scratch / name
            folder.mkdir(parents=True, exist_ok=True)
            paths = []
            for number, (low, high) in enumerate(shard_bounds(len(source), 3)):
                paths.append(folder / f"part-{number}.index")
                faiss.write_index(fill_range(trained, source.take(np.arange(low, high)), low), str(paths[-1]))
            self.part_counts[name] = len(paths)
            return paths

    monkeypatch.setattr(
        write, "_distributed", lambda index, options: HereParts(None, index / ".work" / "parts", ondisk_from_bytes=0)
    )
    record, vectors, clusters = collection
    _write(tmp_path / "whole", record, vectors, clusters, "ivf")
    _write(tmp_path / "merged", record, vectors, clusters, "ivf")
    manifest = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    lists = manifest["files"]["faiss_lists"]["clip/image"]
    assert lists.endswith(".ivfdata") and manifest["checksums"][lists]["bytes"] > 0
    assert manifest["vector_indexes"]["clip/image"]["parts"] == {"count": 3, "merged": "on disk"}
    assert not (tmp_path / "merged" / ".work").exists()
    shutil.move(tmp_path / "merged", tmp_path / "moved")
    whole, moved = open_index(tmp_path / "whole", device="cpu"), open_index(tmp_path / "moved", device="cpu")
    assert has_ondisk_lists(moved.vector_index("clip/image"))
    in_memory = open_index(tmp_path / "moved", device="cpu", mmap=False)
    assert not has_ondisk_lists(in_memory.vector_index("clip/image"))
    queries = vectors[::89]
    for nprobe in (1, 8):
        expected = _search(whole, queries, nprobe)
        for index in (moved, in_memory):
            found = _search(index, queries, nprobe)
            assert np.array_equal(found[1], expected[1]) and np.array_equal(found[0], expected[0])
    with pytest.raises(InputError, match="merged on disk"):
        remove_from_index(tmp_path / "moved", ids=[whole.items("image")["id"][0]])
    (tmp_path / "moved" / lists).write_bytes(b"\0" * manifest["checksums"][lists]["bytes"])  # damaged lists: refused
    with pytest.raises(Exception, match="sha256"):
        open_index(tmp_path / "moved", device="cpu").vector_index("clip/image")


def test_build_index_cli_writes_index_shards(small_collection, tiny_clip_dir, tmp_path):
    from click.testing import CliRunner

    from retrieval.api.engine import open_index
    from retrieval.cli.main import main
    from retrieval.index.sharded import ShardedIndex

    def build(index: Path, *extra: str) -> None:
        args = [
            "build-index",
            "--images",
            str(small_collection / "images"),
            "--captions",
            str(small_collection / "captions.txt"),
            "--index",
            str(index),
            "--encoder",
            "open_clip:tiny",
            "--checkpoint",
            str(tiny_clip_dir),
            "--device",
            "cpu",
            "--index-type",
            "flat",
            "--workers",
            "0",
            "--quiet",
            *extra,
        ]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output

    build(tmp_path / "whole")
    build(tmp_path / "sharded", "--index-shards", "2")
    whole, sharded = open_index(tmp_path / "whole", device="cpu"), open_index(tmp_path / "sharded", device="cpu")
    assert isinstance(sharded.vector_index("clip/image"), ShardedIndex)
    assert sharded.manifest["index"]["shards"] == 2 and "shards" not in whole.manifest["index"]
    for text in ("a plate of food", "a man riding a horse"):
        assert [h.id for h in sharded.text_to_image(text, k=4)] == [h.id for h in whole.text_to_image(text, k=4)]
    image = sorted((small_collection / "images").glob("*.jpg"))[1]
    assert [h.id for h in sharded.image_to_caption(image, k=2)] == [h.id for h in whole.image_to_caption(image, k=2)]
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert "--ray" in result.output
