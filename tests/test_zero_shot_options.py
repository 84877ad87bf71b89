"""Sharper zero-shot ASIF with the offline encoders: multi-crop pooling and WordNet glosses on the built-in anchors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import IMAGENET, require_shared_data
from PIL import Image
from test_engine_asif import reference_relative

import retrieval
from retrieval import BuildOptions, EmbedOptions, EncoderChoice
from retrieval.asif.anchors import (
    AnchorSet,
    AnchorSpaces,
    anchor_texts_of,
    class_prompts,
)
from retrieval.asif.pooling import pool_views, relative_of_views
from retrieval.asif.relative import AsifParams
from retrieval.asif.wordnet import imagenet_wordnet
from retrieval.core.errors import InputError
from retrieval.sources.crops import crop_boxes, photo_crops
from retrieval.store.layout import MANIFEST_NAME

QUIET = EmbedOptions(batch_size=8, workers=0, progress=False)
UNIMODAL = EncoderChoice(image="efficientnet-lite0", text="minilm", device="cpu")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_crop_pooling_equals_a_numpy_reference():
    rng = np.random.default_rng(0)
    image_anchors, text_anchors = unit(rng.normal(size=(40, 16))), unit(rng.normal(size=(40, 8)))
    views = unit(rng.normal(size=(5, 6, 16))).astype(np.float32)
    spaces = AnchorSpaces([AnchorSet("a", image_anchors, text_anchors, [], {}, {})])
    params = AsifParams(k=7, p=2.0)
    pooled = relative_of_views(spaces, views, params).toarray()
    by_hand = np.stack([reference_relative(views[i], image_anchors, 7, 2.0).mean(axis=0) for i in range(5)])
    np.testing.assert_allclose(pooled, unit(by_hand), atol=1e-5)
    one_view = relative_of_views(spaces, views[:, :1], params).toarray()
    np.testing.assert_allclose(one_view, spaces.relative(views[:, 0], "image", params).toarray(), atol=1e-6)
    with pytest.raises(InputError, match="views per image"):
        pool_views(spaces.relative(views[0], "image", params), 4)


def test_crops_are_the_whole_photo_its_quadrants_and_centre():
    boxes = crop_boxes(640, 480)
    assert boxes == [
        (0, 0, 640, 480),
        (0, 0, 320, 240),
        (320, 0, 640, 240),
        (0, 240, 320, 480),
        (320, 240, 640, 480),
        (160, 120, 480, 360),
    ]
    image = Image.new("RGB", (9, 7), "red")
    crops = photo_crops(image)
    assert crops[0] is image and [c.size for c in crops[1:]] == [(4, 3), (4, 3), (4, 3), (4, 3), (4, 3)]
    assert crop_boxes(9, 7, "none") == [(0, 0, 9, 7)]


def test_gloss_table_covers_the_1000_classes_of_the_builtin_anchors():
    table = imagenet_wordnet()
    assert len(table) == 1000 and len({c.wnid for c in table}) == 1000
    # classifier row i is the i-th ImageNet wnid in sorted order, the order of the table
    assert [c.wnid for c in table] == sorted(c.wnid for c in table)
    require_shared_data()
    with open(IMAGENET / "labels.csv", newline="") as handle:
        by_index = {int(r["class_index"]): r["wnid"] for r in csv.DictReader(handle)}
    assert [c.wnid for c in table] == [by_index[i] for i in range(1000)]
    tabby = table[281]
    assert tabby.wnid == "n02123045" and tabby.gloss == "a cat with a grey or tawny coat mottled with black"
    assert "tabby" in tabby.synonyms and "domestic cat" in tabby.hypernym


def test_class_prompts_with_glosses_name_each_class_with_its_gloss():
    from torchvision.models import EfficientNet_B0_Weights

    names = list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])
    glossed = class_prompts(names, "glosses")
    assert glossed[281] == ["tabby: a cat with a grey or tawny coat mottled with black"]
    assert class_prompts(names, "names")[281] == ["a photo of a tabby."]
    # the classifier's names agree with WordNet's synonyms for nearly every class (the table is aligned)
    agree = sum(
        name.lower() in {s.lower() for s in entry.synonyms}
        for name, entry in zip(names, imagenet_wordnet(), strict=True)
    )
    assert agree >= 700
    with pytest.raises(InputError, match="anchor texts"):
        class_prompts(names, "poems")


def test_old_manifest_entries_keep_their_old_meaning():
    assert anchor_texts_of({"name": "builtin:imagenet"}) == "names"
    assert anchor_texts_of({"name": "/some/anchors"}) == "captions"
    assert anchor_texts_of({"name": "builtin:imagenet", "texts": "glosses"}) == "glosses"


@pytest.mark.slow
def test_index_with_crop_views_and_glosses_end_to_end(tmp_path, small_collection):
    index = retrieval.build_index(
        captions=[small_collection / "pairs.jsonl"],
        index=tmp_path / "i",
        encoders=UNIMODAL,
        anchors="builtin:imagenet",
        embed=QUIET,
        options=BuildOptions(image_views="five"),
    )
    manifest = index.manifest
    assert manifest["image_views"] == "five" and manifest["anchors"][0]["texts"] == "glosses"
    assert index.image_views == "five"
    # the stored image rows are the pooled rows of each photo's six crops
    from retrieval.embed.views import embed_views
    from retrieval.sources.items import ImageRef

    uris = index.items("image")["uri"]
    views = embed_views([ImageRef(path=uri) for uri in uris], index.image_encoder, "five")
    assert views.shape == (len(uris), 6, 1280)
    expected = relative_of_views(index.anchor_spaces, views, index.asif_params).toarray()
    np.testing.assert_allclose(index.relative_index("image").rows.toarray(), expected, atol=2e-3)
    # image queries are pooled the same way: a photo's query row is its stored row, so the scores agree
    captions = index.relative_index("caption").rows
    hits = index.image_to_caption(uris[0], k=5)
    stored = np.sort((captions @ index.relative_index("image").rows[0].T).toarray().ravel())[::-1][:5]
    np.testing.assert_allclose([hit.score for hit in hits], stored, atol=5e-3)
    assert any(hit.image_uri == uris[0] for hit in hits)
    # an index from before the settings (no image_views, no anchor texts) opens with the old behaviour
    plain = retrieval.build_index(
        captions=[small_collection / "pairs.jsonl"],
        index=tmp_path / "p",
        encoders=UNIMODAL,
        anchors="builtin:imagenet-names",
        embed=QUIET,
    )
    assert plain.manifest["image_views"] == "none" and plain.manifest["anchors"][0]["texts"] == "names"
    assert index.info()["image_views"] == "five" and index.info()["anchors"][0]["texts"] == "glosses"
    old = json.loads((tmp_path / "p" / MANIFEST_NAME).read_text())
    old.pop("image_views")
    old.pop("manifest_sha256", None)
    for entry in old["anchors"]:
        entry.pop("texts")
    (tmp_path / "p" / MANIFEST_NAME).write_text(json.dumps(old))
    reopened = retrieval.open_index(tmp_path / "p")
    assert reopened.image_views == "none" and reopened.anchor_spaces.sets[0].texts == "names"
    assert [h.id for h in reopened.image_to_caption(uris[0], k=3)] == [
        h.id for h in plain.image_to_caption(uris[0], k=3)
    ]


def test_image_views_are_refused_for_contrastive_models(tmp_path, small_collection):
    with pytest.raises(InputError, match="`BuildOptions.image_views` 'five' pools ASIF relative rows"):
        retrieval.build_index(
            captions=[small_collection / "pairs.jsonl"],
            index=tmp_path / "c",
            encoders=EncoderChoice(clip="open_clip:ViT-B-32/none"),
            options=BuildOptions(image_views="five"),
        )
    with pytest.raises(InputError, match="`BuildOptions.image_views` must be one of none, five, got 'ten'"):
        BuildOptions(image_views="ten")


@pytest.mark.slow
def test_images_added_to_a_crop_view_index_are_pooled_too(tmp_path, small_collection):
    import shutil

    photos = sorted((small_collection / "images").glob("0*.jpg"))[:3]
    first, later = tmp_path / "first", tmp_path / "later"
    first.mkdir(), later.mkdir()
    for photo in photos[:2]:
        shutil.copy(photo, first / photo.name)
    shutil.copy(photos[2], later / photos[2].name)
    retrieval.build_index(
        images=[first],
        index=tmp_path / "i",
        encoders=UNIMODAL,
        anchors="builtin:imagenet",
        embed=QUIET,
        options=BuildOptions(image_views="five"),
    )
    retrieval.add_to_index(tmp_path / "i", images=[later], embed=QUIET)
    index = retrieval.open_index(tmp_path / "i")
    from retrieval.embed.views import embed_views
    from retrieval.sources.items import ImageRef

    uris = index.items("image")["uri"]
    assert len(uris) == 3 and uris[2].endswith(photos[2].name)
    views = embed_views([ImageRef(path=uri) for uri in uris], index.image_encoder, "five")
    expected = relative_of_views(index.anchor_spaces, views, index.asif_params).toarray()
    np.testing.assert_allclose(index.relative_index("image").rows.toarray(), expected, atol=2e-3)


def test_cli_passes_image_views_to_the_build(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import retrieval.api.build as build_module
    from retrieval.cli.main import main

    seen = {}

    def fake_build(*args, **kwargs):
        seen["image_views"] = args[-1].image_views  # the BuildOptions
        raise InputError("stop here")

    monkeypatch.setattr(build_module, "build_index", fake_build)
    common = [
        "build-index",
        "--images",
        "a",
        "--index",
        str(tmp_path / "i"),
        "--image-encoder",
        "ie",
        "--text-encoder",
        "te",
        "--anchors",
        "builtin:imagenet",
        "--quiet",
    ]
    CliRunner().invoke(main, common + ["--image-views", "five"])
    assert seen["image_views"] == "five"
    CliRunner().invoke(main, common)
    assert seen["image_views"] == "none"
    assert CliRunner().invoke(main, common + ["--image-views", "ten"]).exit_code == 2
