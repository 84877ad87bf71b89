"""Evaluation: metrics against brute-force numpy, sweeps with honest splits, the cache, and the eval CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import IMAGENET, require_shared_data

from retrieval import EmbedOptions, EncoderChoice
from retrieval.asif.anchors import AnchorSet
from retrieval.asif.relative import AsifParams
from retrieval.cli.main import main
from retrieval.core.errors import InputError
from retrieval.embed.cache import EmbeddingCache
from retrieval.eval.data import EvalOptions, check_no_leak, parse_sweep, route_configs
from retrieval.eval.evaluate import (
    LabelledData,
    PairedData,
    RouteConfig,
    evaluate,
    make_scorer,
    sweep,
)
from retrieval.sources.discovery import find_images


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def paired():
    rng = np.random.default_rng(0)
    images = unit(rng, 30, 16)
    owner = np.repeat(np.arange(30), 3)
    captions = images[owner] + 0.9 * unit(rng, 90, 16)
    return PairedData(images, captions / np.linalg.norm(captions, axis=1, keepdims=True), owner)


def test_paired_recall_matches_brute_force(paired):
    result = evaluate(paired, RouteConfig("clip"), [])
    scores = paired.caption_vectors @ paired.image_vectors.T
    t2i = np.array([np.sum(row >= row[o]) - 1 for row, o in zip(scores, paired.caption_owner, strict=True)])
    i2c = np.array(
        [
            np.sum(col[paired.caption_owner != i] >= col[paired.caption_owner == i].max())
            for i, col in enumerate(scores.T)
        ]
    )
    for k in (1, 5, 10):
        assert result["text_to_image"][f"R@{k}"] == pytest.approx(np.mean(t2i < k))
        assert result["image_to_caption"][f"R@{k}"] == pytest.approx(np.mean(i2c < k))
    assert result["text_to_image"]["median_rank"] == np.median(t2i + 1)
    assert result["scored"] == {"text_queries": 90, "image_queries": 30, "images": 30, "captions": 90}
    assert 0.2 < result["text_to_image"]["R@1"] < 1.0  # a test that can tell good from bad


def test_ties_count_against_the_query():
    flat = PairedData(np.zeros((5, 4), np.float32), np.zeros((5, 4), np.float32), np.arange(5))
    result = evaluate(flat, RouteConfig("clip"), [])
    assert result["text_to_image"]["R@1"] == 0.0 and result["text_to_image"]["R@5"] == 1.0


def test_zero_shot_accuracy_and_confusion():
    rng = np.random.default_rng(1)
    prompts = unit(rng, 4, 8)
    labels = rng.integers(0, 4, 200)
    images = prompts[labels] + 1.2 * unit(rng, 200, 8)
    data = LabelledData(images, labels, ["a", "b", "c", "d"], prompts)
    result = evaluate(data, RouteConfig("clip"), [])
    predicted = (images @ prompts.T).argmax(axis=1)
    assert result["top1"] == pytest.approx(np.mean(predicted == labels))
    assert result["top5"] == 1.0
    matrix = np.array(result["confusion"]["matrix"])
    assert matrix.sum() == 200 and np.trace(matrix) == np.sum(predicted == labels)


def test_routes_over_anchors_beat_chance_on_synthetic_cross_modal_data():
    rng = np.random.default_rng(2)
    latent = rng.standard_normal((260, 6))
    to_image, to_text = rng.standard_normal((6, 40)), rng.standard_normal((6, 24))

    def norm(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    images, texts = norm(latent @ to_image), norm(latent @ to_text + 0.3 * rng.standard_normal((260, 24)))
    anchors = AnchorSet("synthetic", images[:200], texts[:200], ["x"] * 200, {}, {}, AsifParams(20, 2.0))
    data = PairedData(images[200:], texts[200:], np.arange(60))
    for route in ("asif", "projected", "linear"):
        result = evaluate(data, RouteConfig(route, AsifParams(20, 2.0) if route != "linear" else None), [anchors])
        assert result["text_to_image"]["R@1"] > 0.3, (route, result["text_to_image"])  # chance: 1/60
    fused = make_scorer(
        RouteConfig("asif", AsifParams(20, 2.0), (1.0, 1.0)),
        data.image_vectors,
        data.caption_vectors,
        [anchors, anchors],
    )
    single = make_scorer(RouteConfig("asif", AsifParams(20, 2.0)), data.image_vectors, data.caption_vectors, [anchors])
    np.testing.assert_allclose(
        (fused.texts_as_queries @ fused.images_for_text_queries.T).toarray(),
        (single.texts_as_queries @ single.images_for_text_queries.T).toarray(),
        atol=1e-5,
    )


def test_sweep_reports_the_choice_on_the_other_half(paired):
    configs = route_configs(["clip"], None, {}, None)
    result = sweep(paired, configs, [], split=True)
    assert [row["split"] for row in result.rows] == ["tune"] and result.chosen["split"] == "report"
    assert result.rows[0]["scored"]["images"] == 15 and result.chosen["scored"]["images"] == 15
    grid = route_configs(["asif", "linear"], None, parse_sweep(["k=5,10", "p=1,3"]), None)
    assert [c.label() for c in grid] == ["asif k=5 p=1", "asif k=5 p=3", "asif k=10 p=1", "asif k=10 p=3", "linear"]
    with pytest.raises(InputError, match="`EvalOptions.sweep`"):
        parse_sweep(["q=1"])


def test_anchors_that_contain_evaluated_images_are_refused(tmp_path):
    anchors = AnchorSet(
        "mine",
        np.eye(2, dtype=np.float32),
        np.eye(2, dtype=np.float32),
        ["a", "b"],
        {},
        {},
        uris=[str(tmp_path / "x.jpg")],
    )
    check_no_leak([anchors], [tmp_path / "y.jpg"])
    with pytest.raises(InputError, match="leak"):
        check_no_leak([anchors], [tmp_path / "x.jpg"])


def test_embedding_cache_encodes_each_item_once(tmp_path, tiny_clip_dir, small_collection, monkeypatch):
    from retrieval.encoders.registry import load_clip_encoder

    model = load_clip_encoder("open_clip:tiny", checkpoint=tiny_clip_dir, device="cpu")
    refs = find_images([small_collection / "images"])
    options = EmbedOptions(workers=0, progress=False)
    first = EmbeddingCache(tmp_path, model).embed_images(refs, model, options)
    texts = EmbeddingCache(tmp_path, model).encode_texts(["a", "b", "a"], model)
    import retrieval.embed.cache as module

    monkeypatch.setattr(module, "embed_images", lambda *a, **k: pytest.fail("re-encoded a cached image"))
    monkeypatch.setattr(model, "encode_texts", lambda *a, **k: pytest.fail("re-encoded a cached text"))
    again = EmbeddingCache(tmp_path, model)  # a new process would load the same parts
    second = again.embed_images(refs, model, options)
    np.testing.assert_array_equal(first.vectors, second.vectors)
    assert [r.ref.path for r in first.rows] == [r.ref.path for r in second.rows]
    assert [(r.width, r.height) for r in first.rows] == [(r.width, r.height) for r in second.rows]
    assert len(first.errors) == len(second.errors) == 1  # the broken JPEG is reported both times
    np.testing.assert_array_equal(again.encode_texts(["b", "a"], model), texts[[1, 0]])


def test_eval_cli_on_pairs_and_on_a_labelled_folder(tmp_path, small_collection):
    require_shared_data()
    runner = CliRunner()
    common = [
        "--image-encoder",
        "efficientnet-lite0",
        "--text-encoder",
        "minilm",
        "--anchors",
        "builtin:imagenet",
        "--cache",
        str(tmp_path / "cache"),
        "--quiet",
    ]
    result = runner.invoke(
        main,
        [
            "eval",
            str(small_collection / "pairs.jsonl"),
            *common,
            "--route",
            "all",
            "--sweep",
            "k=10,100",
            "--split",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["task"] == "retrieval" and len(report["rows"]) == 5  # asif x2, projected x2, linear
    assert report["chosen"]["split"] == "report" and report["chosen"]["scored"]["images"] == 3
    text = runner.invoke(main, ["eval", str(small_collection / "pairs.jsonl"), *common, "--align", "linear"]).stdout
    assert "asif k=100 p=2" in text and "linear" in text and "t2i R@1" in text
    for label in ("goldfish", "volcano", "banana"):
        (tmp_path / "labelled" / label).mkdir(parents=True)
        shutil.copy(next(IMAGENET.glob(f"*_{label}.JPEG")), tmp_path / "labelled" / label / "a.jpg")
    result = runner.invoke(
        main, ["eval", str(tmp_path / "labelled"), *common, "--caption-template", "a photo of a {label}"]
    )
    assert result.exit_code == 0, result.output
    assert "zero-shot" in result.stdout and "per-class top-1" in result.stdout
    result = runner.invoke(main, ["eval", str(tmp_path / "labelled"), *common, "--json"])
    assert json.loads(result.stdout)["rows"][0]["top1"] == 1.0  # three distinct ImageNet classes, own photos


def test_centering_and_refinement_options():
    rng = np.random.default_rng(3)
    shared = rng.standard_normal(12)
    anchors = AnchorSet("a", unit(rng, 50, 12) + shared, unit(rng, 50, 8), ["x"] * 50, {}, {})
    images = unit(rng, 20, 12) + 3 * shared
    from retrieval.eval.evaluate import center_spaces, refine_prototypes

    centred_images, centred_texts, centred_anchors = center_spaces("collection", images, unit(rng, 4, 8), [anchors])
    np.testing.assert_allclose(np.linalg.norm(centred_images, axis=1), 1, atol=1e-5)
    raw = images - images.mean(axis=0)
    np.testing.assert_allclose(centred_images, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    assert abs(float(centred_anchors[0].image_vectors.mean(axis=0) @ shared)) < abs(
        float(anchors.image_vectors.mean(axis=0) @ shared)
    )
    with pytest.raises(InputError, match="centering"):
        center_spaces("median", images, images, [anchors])
    # refinement moves prototypes towards their confidently assigned images, never using labels
    clusters = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0) + 0.05 * rng.standard_normal((30, 3)).astype(
        np.float32
    )
    start = np.array([[1, 0.6, 0], [0, 1, 0.6], [0.6, 0, 1]], np.float32)
    refined = refine_prototypes(clusters, start, rounds=2)
    assert np.all(np.argmax(refined, axis=1) == [0, 1, 2])
    assert np.all(np.diag(refined) > np.diag(start / np.linalg.norm(start, axis=1, keepdims=True)))
    with pytest.raises(InputError, match="zero-shot"):
        evaluate(PairedData(unit(rng, 3, 4), unit(rng, 3, 4), np.arange(3)), RouteConfig("clip", refine=1), [])


def test_eval_of_an_index_agrees_with_eval_of_its_pairs_file(tmp_path, small_collection):
    import retrieval
    from retrieval.eval.data import evaluate_index, run_eval

    choice = EncoderChoice(image="efficientnet-lite0", text="minilm", device="cpu")
    retrieval.build_index(
        captions=[small_collection / "pairs.jsonl"],
        index=tmp_path / "i",
        encoders=choice,
        anchors="builtin:imagenet",
        embed=EmbedOptions(workers=0, progress=False),
    )
    from_index = evaluate_index(tmp_path / "i")
    from_pairs = run_eval(
        small_collection / "pairs.jsonl",
        choice,
        anchors=["builtin:imagenet"],
        options=EvalOptions(routes=["asif", "projected"], cache_dir=tmp_path / "cache"),
        embed=EmbedOptions(workers=0, progress=False),
    )
    assert [r["route"] for r in from_index["rows"]] == ["asif", "projected"]
    for mine, theirs in zip(from_index["rows"], from_pairs["rows"], strict=True):
        for task in ("text_to_image", "image_to_caption"):
            assert mine[task] == pytest.approx(theirs[task], abs=0.02), (mine["route"], task)  # float16 storage
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "i"), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["rows"][0]["route"] == "asif"


def test_eval_of_an_index_leaves_removed_items_out(tmp_path, small_collection, tiny_clip_dir):
    import retrieval
    from retrieval.api.update import remove_from_index
    from retrieval.eval.data import evaluate_index
    from retrieval.eval.metrics import paired_recall

    choice = EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")
    path = tmp_path / "i"
    retrieval.build_index(
        captions=[small_collection / "pairs.jsonl"],
        index=path,
        encoders=choice,
        embed=EmbedOptions(workers=0, progress=False),
    )
    index = retrieval.open_index(path, device="cpu")
    images, captions = index.items("image"), index.items("caption")
    gone_image = images["id"][2]  # two of its 5 captions go too; the other 3 are left without their image
    owners = list(zip(captions["id"], captions["image_id"], strict=True))
    gone_captions = [cid for cid, owner in owners if owner == gone_image][:2]
    gone_captions += [next(cid for cid, owner in owners if owner == images["id"][0])]
    report = remove_from_index(path, ids=[gone_image, *gone_captions])
    assert report.removed == {"image": 1, "caption": 3} and report.compacted == []  # rows stay, marked deleted

    result = evaluate_index(path)["rows"][0]
    live = [
        row
        for row, owner in enumerate(captions["image_id"])
        if owner != gone_image and captions["id"][row] not in gone_captions
    ]
    assert result["scored"] == {
        "text_queries": len(live),
        "image_queries": 5,
        "images": 5,
        "captions": len(live),
    }  # was 30, 6, 6, 30
    # the same numbers as evaluating, from scratch, the stored vectors of the live items only
    vectors = index.store.read_vectors(index.manifest["files"]["vectors"]["clip/image"])
    keep = [row for row, image_id in enumerate(images["id"]) if image_id != gone_image]
    caption_vectors = index.store.read_vectors(index.manifest["files"]["vectors"]["clip/caption"])[live]
    owner = np.array([keep.index(images["id"].index(captions["image_id"][row])) for row in live])
    expected = evaluate(PairedData(vectors[keep], caption_vectors, owner), RouteConfig("clip"), [])
    for task in ("text_to_image", "image_to_caption"):
        assert result[task] == pytest.approx(expected[task])
    # the search-based recall (one recall definition, ties counted against the query) skips them too and agrees
    # on text -> image (image -> caption also meets the 3 captions left without their image, live in the index)
    searched = paired_recall(retrieval.open_index(path, device="cpu"))
    assert searched["queries"] == {"text": len(live), "image": 5}
    assert searched["text_to_image"] == pytest.approx(
        {k: expected["text_to_image"][f"R@{k}"] for k in (1, 5, 10)}, abs=1e-6
    )


def test_one_recall_definition_ties_count_against_in_search_results_too():
    from retrieval.eval.evaluate import rank_of_relevant, recall_table
    from retrieval.eval.metrics import first_relevant_rank, recall_at_k
    from retrieval.index.recall import recall_from_ranks

    # item 1 is relevant and ties with item 3 at the top: rank 1, as full scoring counts it, not 0 by list order
    positions, scores = np.array([[1, 3, 2], [2, 0, -1]]), np.array([[0.5, 0.5, 0.1], [0.9, 0.2, 0.0]])
    ranks = first_relevant_rank(positions, [{1}, {0}], scores)
    full = rank_of_relevant(
        np.eye(2, dtype=np.float32),
        np.array([[0.5, 0.5, 0.1, 0.0], [0.2, 0.0, 0.9, 0.0]], np.float32).T,
        lambda q: np.array([1, 0][q]),
    )
    np.testing.assert_array_equal(ranks, [1, 1])
    np.testing.assert_array_equal(full, [1, 1])
    assert first_relevant_rank(np.array([[2, 3]]), [{1}], np.array([[0.9, 0.8]]))[0] == -1  # not returned: not found
    assert recall_at_k(ranks, (1, 2)) == {1: 0.0, 2: 1.0}
    assert recall_table(full, (1, 2)) == {"R@1": 0.0, "R@2": 1.0, "median_rank": 2.0}
    np.testing.assert_array_equal(recall_from_ranks(np.array([0, 4, -1]), 5), [1.0, 1.0, 0.0])
