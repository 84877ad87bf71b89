"""image -> image and text -> caption, in CLIP and ASIF indexes, against brute force over the stored vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TEST_DEVICE
from PIL import Image

import retrieval
from retrieval import EmbedOptions, EncoderChoice
from retrieval.api.update import remove_from_index
from retrieval.cli.main import main
from retrieval.core.errors import InputError
from retrieval.sources.items import load_image

QUIET = EmbedOptions(batch_size=8, workers=0, progress=False)
TEXT = "a plate of food on a table"


def _clip(tiny_clip_dir) -> EncoderChoice:
    return EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device=TEST_DEVICE)


@pytest.fixture(scope="module", params=["clip", "asif"])
def built(request, tmp_path_factory, small_collection):
    """A CLIP (tiny model) or ASIF (EfficientNet-Lite0 + MiniLM, ImageNet anchors) index of 6 photos and 30 captions."""
    path = tmp_path_factory.mktemp(request.param) / "index"
    if request.param == "clip":
        encoders, anchors = _clip(request.getfixturevalue("tiny_clip_dir")), None
    else:
        encoders, anchors = (
            EncoderChoice(image="efficientnet-lite0", text="minilm", device=TEST_DEVICE),
            "builtin:imagenet",
        )
    retrieval.build_index(
        images=[small_collection / "images"],
        captions=[small_collection / "pairs.jsonl"],
        index=path,
        encoders=encoders,
        anchors=anchors,
        embed=QUIET,
    )
    return path


@pytest.fixture(scope="module")
def opened(built):
    """The index opened once for the tests that only read it (its encoders load once)."""
    return retrieval.open_index(built, device=TEST_DEVICE)


def _stored(index, kind: str) -> np.ndarray:
    return index.store.read_vectors(index.manifest["files"]["vectors"][f"{index.manifest['spaces'][kind]}/{kind}"])


def _brute_force(
    index, kind: str, query: np.ndarray, k: int, drop: set[str] = frozenset()
) -> tuple[list[str], np.ndarray]:
    """(ids, scores) of the best ``k`` live ``kind`` items by inner product with the stored (float16) vectors."""
    scores = _stored(index, kind) @ query
    ids = index.items(kind)["id"]
    dead = set(index.deleted(kind).tolist())
    order = [p for p in np.argsort(-scores, kind="stable") if p not in dead and ids[p] not in drop][:k]
    return [ids[p] for p in order], scores


def _assert_top_k(hits, index, kind: str, query: np.ndarray, k: int, drop: set[str] = frozenset()) -> None:
    """The hits are a top-k by brute force: same scores (float16 storage), each hit scored as brute force scores it."""
    expected_ids, scores = _brute_force(index, kind, query, k, drop)
    position = {item: p for p, item in enumerate(index.items(kind)["id"])}
    assert [h.rank for h in hits] == list(range(1, len(expected_ids) + 1))
    np.testing.assert_allclose([h.score for h in hits], [scores[position[i]] for i in expected_ids], atol=2e-3)
    np.testing.assert_allclose([h.score for h in hits], [scores[position[h.id]] for h in hits], atol=2e-3)
    assert not {h.id for h in hits} & drop
    if len(set(np.round(scores, 3))) == len(scores):  # no near-ties: the order is determined
        assert [h.id for h in hits] == expected_ids


def _photos(small_collection) -> list:
    return sorted((small_collection / "images").glob("0*.jpg"))


def test_image_to_image_matches_brute_force(opened, small_collection):
    index = opened
    photo = _photos(small_collection)[1]
    query = index.image_encoder.encode_images([load_image(photo).image])[0]
    hits = index.image_to_image(photo, k=4)
    _assert_top_k(hits, index, "image", query, 4)
    assert all(isinstance(h, retrieval.ImageHit) for h in hits)
    assert hits[0].uri == str(photo.resolve()) and hits[0].score > 0.99  # the photo itself is indexed
    batch = index.images_to_images([photo, Image.open(photo)], k=4)
    assert [[h.id for h in row] for row in batch] == [[h.id for h in hits]] * 2


def test_text_to_caption_matches_brute_force(opened):
    index = opened
    query = index.text_encoder.encode_texts([TEXT])[0]
    hits = index.text_to_caption(TEXT, k=5)
    _assert_top_k(hits, index, "caption", query, 5)
    assert all(isinstance(h, retrieval.CaptionHit) and h.caption and h.image_uri for h in hits)
    texts = [TEXT, "a man riding a horse"]
    batch = index.texts_to_captions(texts, k=5)
    assert [h.id for h in batch[0]] == [h.id for h in hits]
    _assert_top_k(batch[1], index, "caption", index.text_encoder.encode_texts(texts[1:])[0], 5)
    assert len(index.text_to_caption(TEXT, k=100)) == 30  # k larger than the collection


def test_exclude_self_drops_the_query_and_keeps_k(opened, small_collection, tmp_path):
    index = opened
    photos = _photos(small_collection)
    photo = photos[2]
    own_id = index.items("image")["id"][index.items("image")["uri"].index(str(photo.resolve()))]
    query = index.image_encoder.encode_images([load_image(photo).image])[0]
    roundabout = photo.parent / ".." / photo.parent.name / photo.name  # another spelling, same resolved path
    hits = index.image_to_image(str(roundabout), k=3, exclude_self=True)
    assert len(hits) == 3 and own_id not in [h.id for h in hits]
    _assert_top_k(hits, index, "image", query, 3, drop={own_id})
    assert len(index.image_to_image(photo, k=100, exclude_self=True)) == 5  # all but itself
    assert index.image_to_image(photo, k=1)[0].id == own_id  # without the flag it is its own best match
    # a PIL image has no path: nothing excluded, unless its id is given
    assert index.images_to_images([Image.open(photo)], k=1, exclude_self=True)[0][0].id == own_id
    named = index.images_to_images([Image.open(photo)], k=3, exclude_self=True, query_ids=[own_id])[0]
    assert [h.id for h in named] == [h.id for h in hits]
    # a query image that is not in the index loses nothing
    outside = tmp_path / "copy.jpg"
    outside.write_bytes(photo.read_bytes())
    assert [h.id for h in index.image_to_image(outside, k=3, exclude_self=True)] == [
        h.id for h in index.image_to_image(photo, k=3)
    ]
    with pytest.raises(InputError, match="1 query ids for 2 images"):
        index.images_to_images([photo, photo], exclude_self=True, query_ids=[own_id])


def test_deleted_rows_are_never_returned(built, small_collection, tmp_path):
    import shutil

    path = tmp_path / "index"
    shutil.copytree(built, path)
    before = retrieval.open_index(path, device=TEST_DEVICE)
    photo = _photos(small_collection)[0]
    own, neighbour = [h.id for h in before.image_to_image(photo, k=2)]  # itself, then its nearest neighbour
    gone_caption = before.text_to_caption(TEXT, k=1)[0].id
    remove_from_index(path, ids=[neighbour, gone_caption])  # few enough to be kept as deleted rows, not compacted
    index = retrieval.open_index(path, device=TEST_DEVICE)
    assert len(index.deleted("image")) == 1 and len(index.deleted("caption")) == 1
    image_query = index.image_encoder.encode_images([load_image(photo).image])[0]
    hits = index.image_to_image(photo, k=10)
    assert len(hits) == 5 and neighbour not in [h.id for h in hits]
    _assert_top_k(hits, index, "image", image_query, 10)
    alone = index.image_to_image(photo, k=2, exclude_self=True)
    assert len(alone) == 2 and not {own, neighbour} & {h.id for h in alone}
    _assert_top_k(alone, index, "image", image_query, 2, drop={own})
    text_query = index.text_encoder.encode_texts([TEXT])[0]
    captions = index.text_to_caption(TEXT, k=100)
    assert len(captions) == 29 and gone_caption not in [h.id for h in captions]
    _assert_top_k(captions[:5], index, "caption", text_query, 5)


def test_routes_of_each_query(opened):
    index = opened
    same = ["clip"] if index.mode == "clip" else ["unimodal"]
    cross = ["clip"] if index.mode == "clip" else ["asif", "projected"]
    expected = {"text_to_image": cross, "image_to_caption": cross, "image_to_image": same, "text_to_caption": same}
    assert {q: index.routes_for(q) for q in expected} == expected
    assert index.info()["query_routes"] == expected and index.info()["routes"] == index.routes == cross
    assert [h.id for h in index.text_to_caption(TEXT, k=3, options=retrieval.SearchOptions(route=same[0]))] == [
        h.id for h in index.text_to_caption(TEXT, k=3)
    ]
    wrong = "asif" if index.mode == "clip" else "clip"
    with pytest.raises(
        InputError, match=f"route '{wrong}' not available; text -> caption in this index answers by {same[0]}"
    ):
        index.text_to_caption(TEXT, options=retrieval.SearchOptions(route=wrong))
    with pytest.raises(InputError, match="route 'unimodal' not available; text -> image"):
        index.text_to_image(TEXT, options=retrieval.SearchOptions(route="unimodal"))
    with pytest.raises(InputError, match="unknown query"):
        index.routes_for("caption_to_image")
    with pytest.raises(InputError, match="empty"):
        index.text_to_caption("  ")
    with pytest.raises(InputError, match="`k` must be an integer >= 1, got 0"):
        index.image_to_image(Image.new("RGB", (8, 8)), k=0)


def test_cli_json(built, opened, small_collection, tmp_path):
    index = opened
    photo = _photos(small_collection)[3]
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["image-to-image", str(photo), "--index", str(built), "--json", "-k", "2", "--exclude-self", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == [h.id for h in index.image_to_image(photo, k=2, exclude_self=True)]
    expected = index.image_to_image(photo, k=2, exclude_self=True)[0].to_dict()
    # the CLI encodes the query photo with the CLIP query snapshot's float32 tower, the API with int8 Linear layers
    assert {**rows[0], "score": 0} == {**expected, "score": 0} and "uri" in rows[0]
    assert rows[0]["score"] == pytest.approx(expected["score"], abs=2e-3)
    # several images (a folder with one unreadable file): one {query, hits} object per image, each without itself
    result = runner.invoke(
        main,
        [
            "image-to-image",
            str(small_collection / "images"),
            "--index",
            str(built),
            "--json",
            "-k",
            "2",
            "--exclude-self",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(answers) == 7 and sum("error" in a for a in answers) == 1
    for answer in (a for a in answers if "hits" in a):
        assert len(answer["hits"]) == 2 and answer["query"] not in [hit["uri"] for hit in answer["hits"]]
        assert [hit["id"] for hit in answer["hits"]] == [
            h.id for h in index.image_to_image(answer["query"], k=2, exclude_self=True)
        ]
    result = runner.invoke(
        main, ["text-to-caption", TEXT, "--index", str(built), "--json", "-k", "3", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [
        h.id for h in index.text_to_caption(TEXT, k=3)
    ]
    queries = tmp_path / "queries.txt"
    queries.write_text(f"{TEXT}\na man riding a horse\n")
    result = runner.invoke(
        main,
        [
            "text-to-caption",
            "--queries-file",
            str(queries),
            "--index",
            str(built),
            "--json",
            "-k",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["query"] for a in answers] == [TEXT, "a man riding a horse"]
    assert [[hit["id"] for hit in a["hits"]] for a in answers] == [
        [h.id for h in hits] for hits in index.texts_to_captions([TEXT, "a man riding a horse"], k=2)
    ]
    result = runner.invoke(
        main, ["text-to-caption", TEXT, "--index", str(built), "--route", "projected", "--device", "cpu"]
    )
    assert result.exit_code == 2 and "not available" in result.output
