"""Approximate indexes in real builds, batch queries, and incremental add / remove (atomic)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import COCO, coco_pairs, require_shared_data

import retrieval
from retrieval import BuildOptions, EmbedOptions, EncoderChoice
from retrieval.api.update import add_to_index, remove_from_index
from retrieval.cli.main import main
from retrieval.core.config import IndexOptions
from retrieval.core.errors import InputError
from retrieval.index.recall import exact_scores_of, exact_search, neighbour_recall
from retrieval.index.spec import SearchKnobs
from retrieval.store.writer import StoreWriter

QUIET = EmbedOptions(batch_size=8, workers=0, progress=False)


def clip(tiny_clip_dir):
    return EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")


@pytest.fixture(scope="module")
def caption_files(tmp_path_factory):
    """400 COCO captions split in two text files (first 300, last 100)."""
    require_shared_data()
    root = tmp_path_factory.mktemp("captions")
    texts = [row["caption"] for row in coco_pairs(80)]
    (root / "first.txt").write_text("\n".join(texts[:300]) + "\n", encoding="utf-8")
    (root / "second.txt").write_text("\n".join(texts[300:]) + "\n", encoding="utf-8")
    (root / "all.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def ivf_index(tmp_path_factory, tiny_clip_dir, small_collection, caption_files):
    path = tmp_path_factory.mktemp("ivf") / "index"
    retrieval.build_index(
        images=[small_collection / "images"],
        captions=[caption_files / "all.txt"],
        index=path,
        encoders=clip(tiny_clip_dir),
        embed=QUIET,
        options=BuildOptions(index_options=IndexOptions("ivf", target_recall=0.9)),
    )
    return path


def _exact_caption_ids(index, query_vectors, k, deleted=()):
    store, files = index.store, index.manifest["files"]
    vectors = store.read_vectors(files["vectors"]["clip/caption"])
    scores = query_vectors @ vectors.T
    scores[:, list(deleted)] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ids = index.items("caption")["id"]
    return [[ids[p] for p in row] for row in order]


def test_build_records_the_choice_and_the_measured_recall(ivf_index, small_collection):
    index = retrieval.open_index(ivf_index, device="cpu")
    records = index.manifest["vector_indexes"]
    captions = records["clip/caption"]
    assert captions["choice"]["spec"]["type"] == "ivf" and captions["count"] == 400
    measured = captions["measured"]
    assert (
        measured["query_source"] == "images" and measured["queries"] == 3 and measured["tuning_queries"] == 3
    )  # 6 photos, split
    assert measured["held_out"] and measured["target_reached"] and "nprobe" in measured["knobs"]
    # the tuned knobs hold on photos that took no part in tuning (not only on the ones the tuner saw)
    photos = [
        path
        for path in sorted((COCO / "images").glob("*.jpg"))
        if not (small_collection / "images" / path.name).exists()
    ][:8]
    fresh = index.image_encoder.encode_images([retrieval.sources.items.load_image(path).image for path in photos])
    source = index.vector_source("clip/caption")
    _, found = index.search_vectors("caption", fresh, "image", 10)  # with the recorded knobs
    exact, _ = exact_search(source, fresh, 10)
    assert neighbour_recall(exact_scores_of(source, fresh, found), exact, 10).mean() >= 0.9
    images = records["clip/image"]  # 6 images: too few to train lists, searched exactly
    assert images["choice"]["spec"]["type"] == "flat" and "too few" in images["choice"]["reason"]
    info = index.info()["vector_indexes"]["clip/caption"]
    assert info["recall@10"] == measured["recall@10"] and info["factory"].startswith("IVF")
    result = CliRunner().invoke(main, ["info", "--index", str(ivf_index)])
    assert result.exit_code == 0, result.output
    assert "clip/caption" in result.output and "nprobe=" in result.output and "recall@10" in result.output


def test_nprobe_per_query_reaches_exact_results(ivf_index, small_collection):
    import faiss

    index = retrieval.open_index(ivf_index, device="cpu")
    lists = faiss.extract_index_ivf(index.vector_index("clip/caption")).invlists
    assert "OnDisk" in type(faiss.downcast_InvertedLists(lists)).__name__  # memory-mapped, not loaded
    loaded = retrieval.open_index(ivf_index, device="cpu", mmap=False).vector_index("clip/caption")
    assert "Array" in type(faiss.downcast_InvertedLists(faiss.extract_index_ivf(loaded).invlists)).__name__
    nlist = index.manifest["vector_indexes"]["clip/caption"]["choice"]["spec"]["nlist"]
    photo = sorted((small_collection / "images").glob("*.jpg"))[0]
    query = index.image_encoder.encode_images([retrieval.sources.items.load_image(photo).image])
    hits = index.image_to_caption(photo, k=10, options=retrieval.SearchOptions(knobs=SearchKnobs(nprobe=nlist)))
    assert [h.id for h in hits] == _exact_caption_ids(index, query, 10)[0]


def test_ivfpq_index_reranks_in_faiss_from_the_stored_vectors(tmp_path, tiny_clip_dir, small_collection, caption_files):
    import faiss

    path = tmp_path / "index"
    retrieval.build_index(
        images=[small_collection / "images"],
        captions=[caption_files / "all.txt"],
        index=path,
        encoders=clip(tiny_clip_dir),
        embed=QUIET,
        options=BuildOptions(index_options=IndexOptions("ivfpq", target_recall=0.9)),
    )
    index = retrieval.open_index(path, device="cpu")
    assert index.manifest["vector_indexes"]["clip/caption"]["choice"]["spec"]["type"] == "ivfpq"
    compressed, stored = index.vector_index("clip/caption"), index.vector_source("clip/caption")
    assert stored.advise_random_access() == 1  # the engine already did: one memory-mapped file, re-ranked row by row
    native = stored.native_reranker(compressed)
    assert (
        native is not None and not faiss.downcast_index(native.refine_index).codes.is_owned
    )  # the stored file, viewed
    nlist = index.manifest["vector_indexes"]["clip/caption"]["choice"]["spec"]["nlist"]
    photo = sorted((small_collection / "images").glob("*.jpg"))[0]
    query = index.image_encoder.encode_images([retrieval.sources.items.load_image(photo).image])
    hits = index.image_to_caption(  # the whole list set
        photo, k=5, options=retrieval.SearchOptions(knobs=SearchKnobs(nprobe=nlist, rerank_factor=80))
    )
    assert [h.id for h in hits] == _exact_caption_ids(index, query, 5)[0]


def test_batch_text_queries_equal_single_queries(ivf_index, tmp_path):
    index = retrieval.open_index(ivf_index, device="cpu")
    texts = ["a plate of food", "a man riding a horse", "people at a table"]
    batch = index.texts_to_images(texts, k=3)
    assert [[h.id for h in hits] for hits in batch] == [[h.id for h in index.text_to_image(t, k=3)] for t in texts]
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(texts) + "\n", encoding="utf-8")
    result = CliRunner().invoke(
        main, ["text-to-image", "--queries-file", str(queries), "--index", str(ivf_index), "-k", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [line["query"] for line in lines] == texts
    assert [[h["id"] for h in line["hits"]] for line in lines] == [[h.id for h in hits] for hits in batch]
    both = CliRunner().invoke(main, ["text-to-image", "x", "--queries-file", str(queries), "--index", str(ivf_index)])
    assert both.exit_code != 0 and "one of them" in both.output


def test_batch_image_queries_skip_unreadable_images(ivf_index, small_collection):
    folder = small_collection / "images"
    assert (folder / "broken.jpg").is_file()
    result = CliRunner().invoke(main, ["image-to-caption", str(folder), "--index", str(ivf_index), "-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    answered = [line for line in lines if "hits" in line]
    assert len(answered) == len(list(folder.glob("*.jpg"))) - 1 and all(len(line["hits"]) == 2 for line in answered)
    failed = [line for line in lines if "error" in line]
    assert failed and "broken.jpg" in failed[0]["query"]


@pytest.fixture
def two_step(tmp_path, tiny_clip_dir, small_collection, caption_files):
    """An index of the first 300 captions and 3 photos, and the files to add."""
    images = sorted((small_collection / "images").glob("*.jpg"))
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for path in images[:3]:
        shutil.copy(path, first / path.name)
    for path in images[3:]:
        shutil.copy(path, second / path.name)
    path = tmp_path / "index"
    retrieval.build_index(
        images=[first],
        captions=[caption_files / "first.txt"],
        index=path,
        encoders=clip(tiny_clip_dir),
        embed=QUIET,
        options=BuildOptions(index_options=IndexOptions("ivf", target_recall=0.9)),
    )
    return path, first, second


def test_add_encodes_only_new_items_and_equals_a_full_build(
    two_step, caption_files, tiny_clip_dir, tmp_path, monkeypatch
):
    path, first, second = two_step
    import retrieval.encoders.open_clip as oc

    encoded = []
    original = oc.OpenClipEncoder.encode_texts

    def counting(self, texts, *args, **kwargs):
        encoded.extend(texts)
        return original(self, texts, *args, **kwargs)

    monkeypatch.setattr(oc.OpenClipEncoder, "encode_texts", counting)
    report = add_to_index(
        path,
        images=[first, second],
        captions=[caption_files / "first.txt", caption_files / "second.txt"],
        embed=QUIET,
        device="cpu",
    )
    assert report.added == {"image": 3, "caption": 100}
    assert report.already_present == {"image": 3, "caption": 300}
    assert len(encoded) == 100  # the 300 old captions were not encoded again
    monkeypatch.setattr(oc.OpenClipEncoder, "encode_texts", original)

    updated = retrieval.open_index(path, device="cpu")
    assert updated.manifest["counts"] == {"image": 6, "caption": 400}
    assert updated.manifest["updates"][-1]["op"] == "add"
    full = retrieval.build_index(
        images=[first, second],
        captions=[caption_files / "all.txt"],
        index=tmp_path / "full",
        encoders=clip(tiny_clip_dir),
        embed=QUIET,
        options=BuildOptions(index_options=IndexOptions("flat")),
    )
    # same items, same scores (a random tiny model makes near-ties, so compare scores, not orders); image vectors
    # come from other batches here, and the CPU's int8 image tower scales activations per batch: < 2e-3 apart
    for text in ("a plate of food", "a man riding a horse"):
        got, want = updated.text_to_image(text, k=6), full.text_to_image(text, k=6)
        assert {h.id for h in got} == {h.id for h in want}
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=2e-3)
    nlist = updated.manifest["vector_indexes"]["clip/caption"]["choice"]["spec"]["nlist"]
    for photo in sorted(second.glob("0*.jpg")):
        got, want = (
            updated.image_to_caption(photo, k=5, options=retrieval.SearchOptions(knobs=SearchKnobs(nprobe=nlist))),
            full.image_to_caption(photo, k=5),
        )
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-4)
    assert updated.manifest["vector_indexes"]["clip/caption"]["measured"]["recall@10"] >= 0.9


def test_remove_by_id_and_path_hides_items_then_compacts(two_step, caption_files):
    path, first, _ = two_step
    index = retrieval.open_index(path, device="cpu")
    photo = sorted(first.glob("*.jpg"))[0]
    top = index.image_to_caption(photo, k=3)
    report = remove_from_index(path, ids=[top[0].id], paths=[sorted(first.glob("*.jpg"))[1]])
    assert report.removed == {"image": 1, "caption": 1}
    assert report.compacted == ["image"]  # 1 of 3 images is over the threshold; 1 of 300 captions is not
    after = retrieval.open_index(path, device="cpu")
    assert after.manifest["counts"] == {"image": 2, "caption": 299}
    assert top[0].id not in [h.id for h in after.image_to_caption(photo, k=20)]
    assert sorted(first.glob("*.jpg"))[1].name not in [
        h.uri.rsplit("/", 1)[-1] for h in after.text_to_image("food", k=10)
    ]
    assert after.info()["deleted"] == {"image": 0, "caption": 1} and after.rows("caption") == 300
    with pytest.raises(InputError, match="nothing to remove"):
        remove_from_index(path, ids=[top[0].id])

    report = remove_from_index(path, paths=[caption_files / "first.txt"])  # every caption of that file: compaction
    assert report.compacted == ["caption"] and report.removed["caption"] == 299
    compacted = retrieval.open_index(path, device="cpu")
    assert compacted.manifest["counts"]["caption"] == 0 and compacted.rows("caption") == 0
    with pytest.raises(InputError, match="no captions"):
        compacted.image_to_caption(photo)


def test_compaction_keeps_results_of_the_live_rows(two_step, caption_files):
    path, first, _ = two_step
    index = retrieval.open_index(path, device="cpu")
    ids = index.items("caption")["id"]
    doomed = ids[::3]  # a third of the captions: above the compaction threshold
    photo = sorted(first.glob("*.jpg"))[0]
    query = index.image_encoder.encode_images([retrieval.sources.items.load_image(photo).image])
    deleted_positions = [ids.index(i) for i in doomed]
    expected = _exact_caption_ids(index, query, 5, deleted_positions)[0]
    report = remove_from_index(path, ids=doomed)
    assert report.compacted == ["caption"]
    after = retrieval.open_index(path, device="cpu")
    assert after.rows("caption") == 300 - len(doomed) and after.info()["deleted"]["caption"] == 0
    nlist = after.manifest["vector_indexes"]["clip/caption"]["choice"]["spec"]["nlist"]
    assert [
        h.id
        for h in after.image_to_caption(photo, k=5, options=retrieval.SearchOptions(knobs=SearchKnobs(nprobe=nlist)))
    ] == expected


def test_updates_are_atomic_for_readers_and_on_crash(two_step, caption_files, monkeypatch):
    path, first, second = two_step
    reader = retrieval.open_index(path, device="cpu")  # opened before the updates
    before = [h.id for h in reader.text_to_image("a plate of food", k=3)]

    def dies(self, *args, **kwargs):
        raise KeyboardInterrupt("killed before the commit")

    monkeypatch.setattr(StoreWriter, "commit", dies)
    with pytest.raises(KeyboardInterrupt):
        add_to_index(path, images=[second], captions=[caption_files / "second.txt"], embed=QUIET, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        remove_from_index(path, ids=before[:1])
    monkeypatch.undo()
    survivor = retrieval.open_index(path, device="cpu")
    assert survivor.manifest["counts"] == {"image": 3, "caption": 300}
    assert [h.id for h in survivor.text_to_image("a plate of food", k=3)] == before

    add_to_index(path, images=[second], captions=[caption_files / "second.txt"], embed=QUIET, device="cpu")
    remove_from_index(path, ids=before[:1])
    assert [h.id for h in reader.text_to_image("a plate of food", k=3)] == before  # the old snapshot, still whole
    now = retrieval.open_index(path, device="cpu")
    assert now.manifest["counts"] == {"image": 5, "caption": 400}
    referenced = set(now.manifest["checksums"])
    on_disk = {
        p.relative_to(path).as_posix()
        for folder in ("items", "vectors", "faiss")
        for p in (path / folder).rglob("*")
        if p.is_file()
    }
    assert on_disk == {
        rel for rel in referenced if rel.split("/")[0] in ("items", "vectors", "faiss")
    }  # crash leftovers removed


def test_cli_add_and_remove(two_step, caption_files):
    path, _, second = two_step
    runner = CliRunner()
    result = runner.invoke(
        main, ["add", "--index", str(path), "--captions", str(caption_files / "second.txt"), "-q", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["added"] == {"image": 0, "caption": 100}
    hit = retrieval.open_index(path, device="cpu").text_to_image("food", k=1)[0]
    result = runner.invoke(main, ["remove", "--index", str(path), "--id", hit.id, "--id", "no-such-id"])
    assert result.exit_code == 0, result.output
    assert "removed 1 images" in result.output and "no-such-id" in result.output
    result = runner.invoke(main, ["remove", "--index", str(path)])
    assert result.exit_code != 0 and "nothing to remove" in result.output


def test_adding_nothing_new_commits_nothing_and_is_no_error(two_step, caption_files):
    """A cron job that reruns the same add: nothing new is no failure (exit 0), unless --strict asks for one."""
    path, first, _ = two_step
    before = retrieval.open_index(path, device="cpu").manifest
    report = add_to_index(path, images=[first], captions=[caption_files / "first.txt"], embed=QUIET, device="cpu")
    assert report.nothing_new and report.added == {"image": 0, "caption": 0}
    assert report.already_present == {"image": 3, "caption": 300} and report.counts == {"image": 3, "caption": 300}
    after = retrieval.open_index(path, device="cpu").manifest
    assert after["build_id"] == before["build_id"] and "updates" not in after  # no new build
    runner = CliRunner()
    args = ["add", "--index", str(path), "--captions", str(caption_files / "first.txt"), "-q"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "nothing new to add" in result.output and "300 captions already in the index" in result.output
    strict = runner.invoke(main, [*args, "--strict"])
    assert strict.exit_code == 2 and "nothing new to add" in strict.output
    assert json.loads(runner.invoke(main, [*args, "--json"]).output)["added"] == {"image": 0, "caption": 0}
