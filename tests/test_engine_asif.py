"""ASIF indexes with the real offline encoders (EfficientNet-Lite0 + MiniLM) on a handful of real photos."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import IMAGENET, require_shared_data
from PIL import Image

import retrieval
from retrieval import AsifParams, BuildOptions, CaptionOptions, EmbedOptions, EncoderChoice
from retrieval.asif.anchors import AnchorSet
from retrieval.cli.main import main
from retrieval.core.errors import EncoderMismatchError

QUIET = EmbedOptions(batch_size=8, workers=0, progress=False)
UNIMODAL = EncoderChoice(image="efficientnet-lite0", text="minilm", device="cpu")
CLASSES = [
    "goldfish",
    "tree frog",
    "golden retriever",
    "tabby",
    "zebra",
    "airliner",
    "pizza",
    "banana",
    "volcano",
    "sports car",
    "lemon",
    "castle",
]


def reference_relative(vectors: np.ndarray, anchors: np.ndarray, k: int, p: float) -> np.ndarray:
    """ASIF in plain numpy: top-k similarities, clip at 0, power p, L2-normalise."""
    sims = vectors @ anchors.T
    out = np.zeros_like(sims)
    for row, values in enumerate(sims):
        top = np.argsort(-values, kind="stable")[:k]
        out[row, top] = np.maximum(values[top], 0) ** p
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms == 0, 1, norms)


def reference_fused(vectors: np.ndarray, anchor_sets: list, weights: list[float], k: int, p: float) -> np.ndarray:
    """Fused ASIF rows in plain numpy: each set's rows times sqrt(weight), side by side, L2-normalised."""
    parts = [
        np.sqrt(w) * reference_relative(vectors, np.asarray(a, np.float32), k, p)
        for a, w in zip(anchor_sets, weights, strict=True)
    ]
    joined = np.hstack(parts)
    norms = np.linalg.norm(joined, axis=1, keepdims=True)
    return joined / np.where(norms == 0, 1, norms)


@pytest.fixture(scope="module")
def imagenet_subset(tmp_path_factory):
    """A labels.csv naming 12 ImageNet sample photos (read in place) with their class names."""
    require_shared_data()
    root = tmp_path_factory.mktemp("imagenet")
    with open(IMAGENET / "labels.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["class_name"] in CLASSES]
    assert len(rows) == len(CLASSES)
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "class_name"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"file": str(IMAGENET / row["file"]), "class_name": row["class_name"].replace("_", " ")})
    return root / "labels.csv"


@pytest.fixture(scope="module")
def anchor_dir(tmp_path_factory, imagenet_subset):
    out = tmp_path_factory.mktemp("anchors") / "a"
    retrieval.build_anchors(
        [imagenet_subset],
        out,
        EncoderChoice(image="efficientnet-lite0", text="minilm", device="cpu"),
        caption_options=CaptionOptions(image_column="file", template="a photo of a {class_name}"),
        embed=QUIET,
        asif=AsifParams(k=5, p=2.0),
    )
    return out


@pytest.fixture(scope="module")
def asif_index(tmp_path_factory, anchor_dir, small_collection):
    return retrieval.build_index(
        captions=[small_collection / "pairs.jsonl"],
        index=tmp_path_factory.mktemp("asif") / "i",
        encoders=UNIMODAL,
        anchors=anchor_dir,
        embed=QUIET,
    )


def test_anchor_directory(anchor_dir):
    anchors = retrieval.load_anchor_set(anchor_dir)
    assert len(anchors) == len(CLASSES)
    assert anchors.image_vectors.shape == (12, 1280) and anchors.text_vectors.shape == (12, 384)
    np.testing.assert_allclose(np.linalg.norm(anchors.text_vectors, axis=1), 1, atol=1e-5)
    assert anchors.params == AsifParams(k=5, p=2.0)
    assert anchors.captions[0].startswith("a photo of a ")
    manifest = json.loads((anchor_dir / "manifest.json").read_text())
    assert manifest["image_encoder"]["spec"] == "efficientnet-lite0" and manifest["text_encoder"]["spec"] == "minilm"


def test_asif_index_scores_match_a_numpy_reference(asif_index):
    assert asif_index.mode == "asif" and asif_index.asif_params == AsifParams(k=5, p=2.0)
    store, files = asif_index.store, asif_index.manifest["files"]
    anchor_images, anchor_texts = (
        store.read_array(files["anchors"][0]["image"]),
        store.read_array(files["anchors"][0]["text"]),
    )
    image_vectors = store.read_vectors(files["vectors"]["image/image"])
    # stored relative rows = numpy ASIF of the stored (float16) vectors
    stored_rows = asif_index.relative_index("image").rows.toarray()
    np.testing.assert_allclose(stored_rows, reference_relative(image_vectors, anchor_images, 5, 2.0), atol=5e-3)
    # a query scores by the inner product of its relative vector with the stored rows
    query = asif_index.text_encoder.encode_texts(["people eating cake at a table"])
    expected = stored_rows @ reference_relative(query, anchor_texts, 5, 2.0)[0]
    hits = asif_index.text_to_image("people eating cake at a table", k=6)
    uris = asif_index.items("image")["uri"]
    np.testing.assert_allclose([h.score for h in hits], np.sort(expected)[::-1], atol=1e-5)
    assert [expected[uris.index(h.uri)] for h in hits] == pytest.approx([h.score for h in hits], abs=1e-5)


def test_projected_route_matches_a_numpy_reference(asif_index):
    """Images projected into text space (ASIF weights x text anchors) answer a raw text query."""
    assert asif_index.routes == ["asif", "projected"]
    store, files = asif_index.store, asif_index.manifest["files"]
    anchor_images, anchor_texts = (
        store.read_array(files["anchors"][0]["image"]),
        store.read_array(files["anchors"][0]["text"]),
    )
    image_vectors = store.read_vectors(files["vectors"]["image/image"])
    projected = reference_relative(image_vectors, anchor_images, 5, 2.0) @ anchor_texts
    projected /= np.linalg.norm(projected, axis=1, keepdims=True)
    query = asif_index.text_encoder.encode_texts(["a man riding a horse"])[0]
    expected = projected @ query
    hits = asif_index.text_to_image("a man riding a horse", k=6, options=retrieval.SearchOptions(route="projected"))
    np.testing.assert_allclose([h.score for h in hits], np.sort(expected)[::-1], atol=5e-3)
    with pytest.raises(retrieval.InputError, match="route 'clip' not available"):
        asif_index.text_to_image("a horse", options=retrieval.SearchOptions(route="clip"))


def test_fused_anchor_sets_in_an_index(tmp_path, anchor_dir, small_collection):

    index = retrieval.build_index(
        captions=[small_collection / "pairs.jsonl"],
        index=tmp_path / "fused",
        encoders=UNIMODAL,
        anchors=[anchor_dir, "builtin:imagenet"],
        embed=QUIET,
        # the sets' own k differ (5 and 100): fused sets need one chosen; p (2) they share
        options=BuildOptions(anchor_weights=[1.0, 0.5], asif=AsifParams(k=5)),
    )
    assert index.asif_params == AsifParams(k=5, p=2.0)
    info = index.info()
    assert [(a["count"], a["weight"]) for a in info["anchors"]] == [(12, 1.0), (1000, 0.5)]
    assert index.relative_index("image").n_anchors == 1012
    sets = [retrieval.load_anchor_set(anchor_dir), None]
    from retrieval.asif.anchors import builtin_imagenet

    sets[1] = builtin_imagenet(index.image_encoder, index.text_encoder)
    image_vectors = np.asarray(index.store.read_vectors(index.manifest["files"]["vectors"]["image/image"]), np.float32)
    query = index.text_encoder.encode_texts(["a cake on a table"])
    weights = [1.0, 0.5]
    images = reference_fused(image_vectors, [s.image_vectors for s in sets], weights, 5, 2.0)
    texts = reference_fused(query, [s.text_vectors for s in sets], weights, 5, 2.0)
    expected = (images @ texts.T)[:, 0]
    hits = index.text_to_image("a cake on a table", k=6)
    np.testing.assert_allclose([h.score for h in hits], np.sort(expected)[::-1], atol=5e-3)


def test_image_to_caption_through_anchors(asif_index, small_collection):
    photo = sorted((small_collection / "images").glob("0*.jpg"))[0]
    hits = asif_index.image_to_caption(photo, k=5)
    # numpy reference: the photo's relative row against the image anchors, scored against every stored caption's
    # relative row against the text anchors; the five best, in order
    store, files = asif_index.store, asif_index.manifest["files"]
    anchor_images = np.asarray(store.read_array(files["anchors"][0]["image"]), np.float32)
    anchor_texts = np.asarray(store.read_array(files["anchors"][0]["text"]), np.float32)
    captions = np.asarray(store.read_vectors(files["vectors"]["text/caption"]), np.float32)
    photo_row = reference_relative(asif_index.image_encoder.encode_images([Image.open(photo)]), anchor_images, 5, 2.0)
    scores = reference_relative(captions, anchor_texts, 5, 2.0) @ photo_row[0]
    best = np.argsort(-scores, kind="stable")[:5]
    texts = asif_index.items("caption")["caption"]
    np.testing.assert_allclose([hit.score for hit in hits], scores[best], atol=5e-3)
    assert [hit.caption for hit in hits][:2] == [texts[int(i)] for i in best][:2]  # the clear winners, by text
    assert all(hit.image_uri for hit in hits)  # captions from a pairs file keep their image


def test_anchor_set_built_with_other_encoders_is_refused(asif_index, anchor_dir):
    anchors = retrieval.load_anchor_set(anchor_dir)
    other = AnchorSet(
        anchors.name,
        anchors.image_vectors,
        anchors.text_vectors,
        anchors.captions,
        anchors.image_encoder,
        {**anchors.text_encoder, "fingerprint": "0" * 16},
    )
    with pytest.raises(EncoderMismatchError, match="text side"):
        other.check_encoders(asif_index.image_encoder, asif_index.text_encoder)


def test_builtin_imagenet_anchors_find_the_right_photo(tmp_path, imagenet_subset):
    """Class-name queries over 12 ImageNet photos, bridged only by the classifier's own layer."""
    with open(imagenet_subset, newline="") as handle:
        rows = list(csv.DictReader(handle))
    photos = tmp_path / "photos"
    photos.mkdir()
    for row in rows:
        shutil.copy(row["file"], photos / (row["class_name"].replace(" ", "_") + ".jpg"))
    index = retrieval.build_index(
        images=[photos], index=tmp_path / "i", encoders=UNIMODAL, anchors="builtin:imagenet", embed=QUIET
    )
    assert index.manifest["anchors"][0]["count"] == 1000
    correct = sum(
        index.text_to_image(f"a photo of a {row['class_name']}", k=1)[0].uri.endswith(
            row["class_name"].replace(" ", "_") + ".jpg"
        )
        for row in rows
    )
    assert correct >= 10, f"only {correct}/12 class queries found their photo"


def test_cli_build_anchors_from_a_labelled_folder_and_query(tmp_path, small_collection):
    require_shared_data()
    for label in ("cat", "dog", "ship"):
        (tmp_path / "labelled" / label).mkdir(parents=True)
        for image in sorted((IMAGENET.parent / "cifar10-test" / "test" / label).glob("*.jpg"))[:2]:
            shutil.copy(image, tmp_path / "labelled" / label / image.name)
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "build-anchors",
            "--pairs",
            str(tmp_path / "labelled"),
            "--out",
            str(tmp_path / "anchors"),
            "--image-encoder",
            "efficientnet-lite0",
            "--text-encoder",
            "minilm",
            "--quiet",
            "--k",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote 6 anchor pairs" in result.output and "k=3" in result.output
    result = runner.invoke(
        main,
        [
            "build-index",
            "--captions",
            str(small_collection / "captions.txt"),
            "--index",
            str(tmp_path / "i"),
            "--image-encoder",
            "efficientnet-lite0",
            "--text-encoder",
            "minilm",
            "--anchors",
            str(tmp_path / "anchors"),
            "--quiet",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["mode"] == "asif" and info["asif"]["k"] == 3 and info["counts"]["caption"] == 2
    photo = next((small_collection / "images").glob("0*.jpg"))
    for route in ("asif", "projected"):
        result = runner.invoke(
            main,
            ["image-to-caption", str(photo), "--index", str(tmp_path / "i"), "--json", "-k", "2", "--route", route],
        )
        assert result.exit_code == 0, result.output
        assert len(result.stdout.splitlines()) == 2
    result = runner.invoke(main, ["image-to-caption", str(photo), "--index", str(tmp_path / "i"), "--route", "clip"])
    assert result.exit_code == 2 and "not available" in result.output


def test_add_and_remove_in_an_asif_index_equal_a_full_build(tmp_path, anchor_dir, small_collection):
    """Relative rows and projected vectors of added items equal those of a build of everything."""
    from retrieval.api.update import add_to_index, remove_from_index

    rows = [json.loads(line) for line in (small_collection / "pairs.jsonl").read_text().splitlines()]
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    for row in rows:  # the pairs files name images relative to their own folder
        row["image"] = str((small_collection / row["image"]).resolve())
    first.write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    second.write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    grown = tmp_path / "grown"
    retrieval.build_index(captions=[first], index=grown, encoders=UNIMODAL, anchors=anchor_dir, embed=QUIET)
    add_to_index(grown, captions=[second], embed=QUIET, device="cpu")
    full = retrieval.build_index(
        captions=[first, second], index=tmp_path / "full", encoders=UNIMODAL, anchors=anchor_dir, embed=QUIET
    )
    index = retrieval.open_index(grown, device="cpu")
    assert index.manifest["counts"] == full.manifest["counts"]
    for route in ("asif", "projected"):
        got = index.text_to_image("a man riding a horse", k=4, options=retrieval.SearchOptions(route=route))
        want = full.text_to_image("a man riding a horse", k=4, options=retrieval.SearchOptions(route=route))
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-3)
        assert {h.id for h in got} == {h.id for h in want}
    gone = index.text_to_image("a man riding a horse", k=1)[0]
    remove_from_index(grown, ids=[gone.id])
    after = retrieval.open_index(grown, device="cpu")
    for route in ("asif", "projected"):
        assert gone.id not in [
            h.id
            for h in after.text_to_image("a man riding a horse", k=10, options=retrieval.SearchOptions(route=route))
        ]
