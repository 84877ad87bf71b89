"""Composed queries (``Query``, ``Index.search``) against a numpy reference: CLIP with a tiny random model,
ASIF (EfficientNet-Lite0 + MiniLM, 12 anchor pairs) on each route: asif, projected and unimodal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_engine_asif import (  # noqa: F401
    QUIET,
    UNIMODAL,
    anchor_dir,
    imagenet_subset,
    reference_relative,
)

import retrieval
from retrieval import EncoderChoice, InputError, Query
from retrieval.cli.main import main
from retrieval.sources.items import load_image


def unit(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return m / np.linalg.norm(m, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def clip_index(tmp_path_factory, tiny_clip_dir, small_collection):
    return retrieval.build_index(
        images=[small_collection / "images"],
        captions=[small_collection / "pairs.jsonl"],
        index=tmp_path_factory.mktemp("clip") / "i",
        embed=QUIET,
        encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
    )


@pytest.fixture(scope="module")
def asif_index(tmp_path_factory, anchor_dir, small_collection):  # noqa: F811
    return retrieval.build_index(
        images=[small_collection / "images"],
        captions=[small_collection / "pairs.jsonl"],
        index=tmp_path_factory.mktemp("asif") / "i",
        encoders=UNIMODAL,
        anchors=anchor_dir,
        embed=QUIET,
    )


def photos(small_collection) -> list:
    return sorted((small_collection / "images").glob("0*.jpg"))


def stored(index, key: str) -> np.ndarray:
    return index.store.read_vectors(index.manifest["files"]["vectors"][key]).astype(np.float64)


def check_hits(hits, expected: np.ndarray, table: dict, k: int, atol: float) -> None:
    """Hits are the brute-force top k of ``expected`` (scores per stored row): scores close, each hit's own
    reference score its reported one, and no item left out that beats a hit by more than ``atol``."""
    order = np.argsort(-expected, kind="stable")
    np.testing.assert_allclose([h.score for h in hits], expected[order[:k]], atol=atol)
    found = [table["id"].index(h.id) for h in hits]
    left_out = [i for i in order if i not in found]
    assert not left_out or expected[left_out[0]] <= min(expected[found]) + atol
    assert [expected[table["id"].index(h.id)] for h in hits] == pytest.approx([h.score for h in hits], abs=atol)


def test_query_algebra_and_bad_parts():
    query = Query.text("a dog") + Query.text("in the snow") - 0.5 * Query.text("grass")
    assert [(p.weight, p.modality, p.value) for p in query.parts] == [
        (1.0, "text", "a dog"),
        (1.0, "text", "in the snow"),
        (-0.5, "text", "grass"),
    ]
    assert query.describe() == "a dog + in the snow - 0.5*grass"
    assert Query([(2, "image", "x.jpg")]) == 2 * Query.image("x.jpg")
    assert [p.weight for p in Query.images(["a.jpg", "b.jpg"]).parts] == [0.5, 0.5]
    assert (Query.image("a.jpg") + Query.text("at night")).modalities == {"image", "text"}
    for bad, message in [
        (lambda: Query.text(" "), "empty"),
        (lambda: Query.text("a", weight=0), "other than 0"),
        (lambda: Query.text("a", weight=float("nan")), "finite"),
        (lambda: Query(()), "at least one part"),
        (lambda: Query([(1, "audio", "x")]), "modality"),
        (lambda: Query.image(3), "path or a PIL image"),
    ]:
        with pytest.raises(InputError, match=message):
            bad()


def test_clip_mixes_weighted_text_and_image_parts_in_the_shared_space(clip_index, small_collection):
    photo = photos(small_collection)[0]
    query = Query.text("a plate of food") + 0.7 * Query.image(photo) - 0.5 * Query.text("a man riding a horse")
    texts = unit(clip_index.text_encoder.encode_texts(["a plate of food", "a man riding a horse"]))
    image = unit(clip_index.image_encoder.encode_images([load_image(photo).image]))[0]
    reference = unit(texts[0] + 0.7 * image - 0.5 * texts[1])
    for target, key in (("image", "clip/image"), ("caption", "clip/caption")):
        hits = clip_index.search(query, target=target, k=4)
        check_hits(hits, stored(clip_index, key) @ reference, clip_index.items(target), 4, 3e-3)


def same(a: list, b: list) -> bool:
    """The same hits, scores equal up to the renormalisation of the query vector."""
    return [h.id for h in a] == [h.id for h in b] and [h.score for h in a] == pytest.approx(
        [h.score for h in b], abs=1e-5
    )


def test_a_one_part_query_equals_the_plain_query(clip_index, asif_index, small_collection):
    photo = photos(small_collection)[1]
    for index in (clip_index, asif_index):
        assert same(index.search(Query.text("a cake"), k=3), index.text_to_image("a cake", k=3))
        assert same(index.search(Query.image(photo), k=3), index.image_to_image(photo, k=3))
        assert same(index.search(Query.text("a cake"), target="caption", k=3), index.text_to_caption("a cake", k=3))
        assert same(index.search(Query.image(photo), target="caption", k=3), index.image_to_caption(photo, k=3))
    assert same(
        asif_index.search(Query.text("a cake"), k=3, options=retrieval.SearchOptions(route="projected")),
        asif_index.text_to_image("a cake", k=3, options=retrieval.SearchOptions(route="projected")),
    )


@pytest.fixture(scope="module")
def asif_parts(asif_index, small_collection):
    """Encoded parts and anchors of the ASIF reference: two texts and two photos."""
    store, files = asif_index.store, asif_index.manifest["files"]
    pictures = [load_image(p).image for p in photos(small_collection)[:2]]
    return {
        "text": unit(asif_index.text_encoder.encode_texts(["people eating cake", "a horse"])),
        "image": unit(asif_index.image_encoder.encode_images(pictures)),
        "anchors": {
            "image": store.read_array(files["anchors"][0]["image"]).astype(np.float64),
            "text": store.read_array(files["anchors"][0]["text"]).astype(np.float64),
        },
        "photos": photos(small_collection)[:2],
    }


def mixed(parts) -> Query:
    return Query.images(parts["photos"]) + Query.text("people eating cake") - 0.5 * Query.text("a horse")


def reference_parts(parts, into) -> list[np.ndarray]:
    """The four parts of :func:`mixed` (photo, photo, text, text) each mapped by ``into(vector, modality)``."""
    return [
        into(parts["image"][0], "image"),
        into(parts["image"][1], "image"),
        into(parts["text"][0], "text"),
        into(parts["text"][1], "text"),
    ]


WEIGHTS = [0.5, 0.5, 1.0, -0.5]


def test_asif_route_combines_relative_rows(asif_index, asif_parts):
    def relative(vector, modality):
        return reference_relative(vector[None, :], asif_parts["anchors"][modality], 5, 2.0)[0]

    reference = unit(sum(w * row for w, row in zip(WEIGHTS, reference_parts(asif_parts, relative), strict=True)))
    for target in ("image", "caption"):
        hits = asif_index.search(mixed(asif_parts), target=target, k=5)  # the default route of a mixed query
        items = asif_index.relative_index(target).rows.toarray().astype(np.float64)
        check_hits(hits, items @ reference, asif_index.items(target), 5, 5e-3)


def project(anchors, vector, modality, into):
    return unit(reference_relative(vector[None, :], anchors[modality], 5, 2.0)[0] @ anchors[into])


def test_projected_route_projects_image_parts_into_the_text_space(asif_index, asif_parts):
    anchors = asif_parts["anchors"]
    reference = unit(
        sum(
            w * row
            for w, row in zip(
                WEIGHTS,
                reference_parts(asif_parts, lambda v, m: v if m == "text" else project(anchors, v, "image", "text")),
                strict=True,
            )
        )
    )
    items = unit(reference_relative(stored(asif_index, "image/image"), anchors["image"], 5, 2.0) @ anchors["text"])
    hits = asif_index.search(mixed(asif_parts), target="image", k=5, options=retrieval.SearchOptions(route="projected"))
    check_hits(hits, items @ reference, asif_index.items("image"), 5, 5e-3)


def test_unimodal_route_projects_text_parts_into_the_image_space(asif_index, asif_parts):
    anchors = asif_parts["anchors"]
    reference = unit(
        sum(
            w * row
            for w, row in zip(
                WEIGHTS,
                reference_parts(asif_parts, lambda v, m: v if m == "image" else project(anchors, v, "text", "image")),
                strict=True,
            )
        )
    )
    hits = asif_index.search(mixed(asif_parts), target="image", k=5, options=retrieval.SearchOptions(route="unimodal"))
    check_hits(hits, stored(asif_index, "image/image") @ reference, asif_index.items("image"), 5, 5e-3)
    photo_only = asif_index.search(Query.images(asif_parts["photos"]), k=3)  # several images averaged, own space
    check_hits(
        photo_only,
        stored(asif_index, "image/image") @ unit(asif_parts["image"].sum(0)),
        asif_index.items("image"),
        3,
        5e-3,
    )


def test_routes_errors_and_exclusions(asif_index, clip_index, asif_parts):
    with pytest.raises(InputError, match="route 'asif' not available.*unimodal"):
        asif_index.search(Query.image(asif_parts["photos"][0]), options=retrieval.SearchOptions(route="asif"))
    with pytest.raises(InputError, match="route 'clip' not available.*asif, projected, unimodal"):
        asif_index.search(mixed(asif_parts), options=retrieval.SearchOptions(route="clip"))
    with pytest.raises(InputError, match="'image' or 'caption'"):
        clip_index.search(Query.text("a"), target="text")
    with pytest.raises(InputError, match="cancel out"):
        clip_index.search(Query.text("a dog") - Query.text("a dog"))
    with pytest.raises(InputError, match="takes a Query"):
        clip_index.search("a dog")
    first = clip_index.search(Query.text("a cake"), k=3)
    rest = clip_index.search(Query.text("a cake"), k=3, exclude=[first[0].id])
    assert [h.id for h in rest] == [h.id for h in clip_index.search(Query.text("a cake"), k=4)][1:]
    assert [h.rank for h in rest] == [1, 2, 3]


def test_cli_plus_and_minus(clip_index, small_collection):
    runner = CliRunner()
    photo = str(photos(small_collection)[0])
    base = ["--index", str(clip_index.path), "--json", "-k", "3", "--device", "cpu"]
    result = runner.invoke(
        main, ["text-to-image", "a plate of food", "--plus", photo, "--minus", "a horse::0.5", *base]
    )
    assert result.exit_code == 0, result.output
    expected = clip_index.search(Query.text("a plate of food") + Query.image(photo) - 0.5 * Query.text("a horse"), k=3)
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [h.id for h in expected]
    result = runner.invoke(main, ["image-to-image", photo, "--plus", "at night", "--exclude-self", *base])
    assert result.exit_code == 0, result.output
    own = retrieval.api.routes.image_id(photo)
    expected = clip_index.search(Query.image(photo) + Query.text("at night"), k=3, exclude=[own])
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [h.id for h in expected]
    assert own in [h.id for h in clip_index.search(Query.image(photo) + Query.text("at night"), k=3)]
    result = runner.invoke(main, ["text-to-image", "a dog", "--plus-image", "missing.jpg", *base])
    assert result.exit_code != 0 and "missing.jpg" in result.output


def test_cli_parts_and_weights(tmp_path, small_collection):
    from retrieval.cli.compose import parse_part

    photo = photos(small_collection)[0]
    assert parse_part("in the snow", 1.0) == retrieval.QueryPart(1.0, "text", "in the snow")
    assert parse_part("grass::0.5", -1.0) == retrieval.QueryPart(-0.5, "text", "grass")
    assert parse_part("at 10:30", 1.0).value == "at 10:30"  # one colon is text, not a weight
    assert parse_part(str(photo), 1.0) == retrieval.QueryPart(1.0, "image", str(photo))
    assert parse_part(f"{photo}::2", -1.0) == retrieval.QueryPart(-2.0, "image", str(photo))
    (tmp_path / "notes.txt").write_text("x")
    assert parse_part(str(tmp_path / "notes.txt"), 1.0).modality == "text"  # not an image name: text
    for value, message in [("grass::lots", "must be a number"), ("grass::-1", "must be > 0")]:
        with pytest.raises(InputError, match=message):
            parse_part(value, 1.0)
    with pytest.raises(InputError, match="no such image file"):
        parse_part("dog", 1.0, force_image=True)


def test_a_composed_query_takes_where_min_score_and_offset(clip_index, asif_index, small_collection):
    """Arithmetic and filters together: the brute-force top k among the items the predicate lets through."""
    photo = photos(small_collection)[0]
    query = Query.text("a plate of food") + 0.7 * Query.image(photo)
    texts = unit(clip_index.text_encoder.encode_texts(["a plate of food"]))
    image = unit(clip_index.image_encoder.encode_images([load_image(photo).image]))[0]
    reference = unit(texts[0] + 0.7 * image)
    table = clip_index.items("caption")
    where = f"image_uri <> '{table['image_uri'][0]}'"  # leave out the captions of one photo
    allowed = np.array([uri != table["image_uri"][0] for uri in table["image_uri"]])
    expected = np.where(allowed, stored(clip_index, "clip/caption") @ reference, -np.inf)
    filtered = retrieval.SearchOptions(where=where)
    hits = clip_index.search(query, target="caption", k=4, options=filtered)
    assert all(table["image_uri"][table["id"].index(h.id)] != table["image_uri"][0] for h in hits)
    check_hits(hits, expected, table, 4, 3e-3)
    more = clip_index.search(query, target="caption", k=8, options=filtered)
    assert [h.id for h in clip_index.search(query, target="caption", k=4, options=filtered.replace(offset=4))] == [
        h.id for h in more[4:8]
    ]
    cut = more[2].score
    assert [h.id for h in clip_index.search(query, target="caption", k=8, options=filtered.replace(min_score=cut))] == [
        h.id for h in more[:3]
    ]
    asif_hits = asif_index.search(
        Query.text("people eating cake") - 0.5 * Query.text("a horse"),
        k=3,
        options=retrieval.SearchOptions(where="width > 0"),
    )
    assert len(asif_hits) == 3
