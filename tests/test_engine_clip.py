"""Build and query an index with a contrastive (tiny, random, on-disk) CLIP model through the Python API."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import retrieval
from retrieval import CaptionHit, EmbedOptions, EncoderChoice, ImageHit
from retrieval.core.errors import EncoderMismatchError, IndexFormatError, InputError

QUIET = EmbedOptions(batch_size=4, workers=0, progress=False)


@pytest.fixture(scope="module")
def clip_index(tmp_path_factory, tiny_clip_dir, small_collection):
    path = tmp_path_factory.mktemp("idx") / "clip"
    choice = EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")
    index = retrieval.build_index(
        images=[small_collection / "images"],
        captions=[small_collection / "pairs.jsonl", small_collection / "captions.txt"],
        index=path,
        encoders=choice,
        embed=QUIET,
    )
    return index


def test_counts_errors_and_manifest(clip_index, small_collection):
    info = clip_index.info()
    assert info["mode"] == "clip"
    assert info["counts"] == {"image": 6, "caption": 32}
    assert info["errors"] == 1
    [error] = clip_index.errors()
    assert error["path"].endswith("broken.jpg") and "truncated" in error["reason"]
    manifest = json.loads((clip_index.path / "manifest.json").read_text())
    assert manifest["encoders"]["image"]["spec"] == manifest["encoders"]["text"]["spec"]
    assert len(manifest["encoders"]["image"]["fingerprint"]) == 16
    assert manifest["encoders"]["image"]["dim"] == 32
    items = clip_index.items("image")
    assert all(len(sha) == 64 for sha in items["sha256"])
    assert all(w > 0 and h > 0 for w, h in zip(items["width"], items["height"], strict=True))


def test_text_to_image_matches_brute_force_over_stored_vectors(clip_index):
    hits = clip_index.text_to_image("a plate of food", k=4)
    assert [hit.rank for hit in hits] == [1, 2, 3, 4]
    assert all(isinstance(hit, ImageHit) for hit in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    query = clip_index.text_encoder.encode_texts(["a plate of food"])[0]
    uris = clip_index.items("image")["uri"]
    stored = clip_index.store.read_vectors(clip_index.manifest["files"]["vectors"]["clip/image"])
    expected = np.argsort(-(stored @ query), kind="stable")[:4]
    assert [hit.uri for hit in hits] == [uris[i] for i in expected]
    np.testing.assert_allclose([h.score for h in hits], (stored @ query)[expected], atol=2e-3)  # float16 storage


def test_image_to_caption_accepts_path_and_pil_image(clip_index, small_collection):
    photo = sorted((small_collection / "images").glob("0*.jpg"))[0]
    by_path = clip_index.image_to_caption(photo, k=3)
    by_image = clip_index.image_to_caption(Image.open(photo), k=3)
    assert [h.id for h in by_path] == [h.id for h in by_image]
    assert all(isinstance(hit, CaptionHit) and hit.caption for hit in by_path)
    assert len(clip_index.image_to_caption(photo, k=100)) == 32  # k larger than the collection


def test_ids_are_stable_across_rebuilds(tmp_path, clip_index, tiny_clip_dir, small_collection):
    again = retrieval.build_index(
        images=[small_collection / "images"],
        captions=[small_collection / "pairs.jsonl", small_collection / "captions.txt"],
        index=tmp_path / "again",
        encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
        embed=QUIET,
    )
    assert again.items("image")["id"] == clip_index.items("image")["id"]
    assert again.items("caption")["id"] == clip_index.items("caption")["id"]


def test_failed_rebuild_keeps_the_previous_index(tmp_path, tiny_clip_dir, small_collection, monkeypatch):
    choice = EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")
    first = retrieval.build_index(
        captions=[small_collection / "pairs.jsonl"], index=tmp_path / "i", encoders=choice, embed=QUIET
    )
    before = [h.id for h in first.text_to_image("people at a table", k=3)]

    import retrieval.api.write as write_module

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("killed half way")

    monkeypatch.setattr(write_module, "_write_asif", dies)
    monkeypatch.setattr(write_module, "write_vector_sets", dies)
    with pytest.raises(KeyboardInterrupt):
        retrieval.build_index(images=[small_collection / "images"], index=tmp_path / "i", encoders=choice, embed=QUIET)
    reopened = retrieval.open_index(tmp_path / "i")
    assert reopened.manifest["counts"] == {"image": 6, "caption": 30}
    assert [h.id for h in reopened.text_to_image("people at a table", k=3)] == before


def test_querying_with_other_weights_is_a_clear_error(tmp_path, small_collection):
    from tiny_clip import make_tiny_clip

    model = make_tiny_clip(tmp_path / "model", seed=1)
    choice = EncoderChoice(clip="open_clip:tiny", checkpoint=str(model), device="cpu")
    retrieval.build_index(
        captions=[small_collection / "pairs.jsonl"], index=tmp_path / "i", encoders=choice, embed=QUIET
    )
    shutil.rmtree(model)
    make_tiny_clip(model, seed=2)  # same path, other weights
    with pytest.raises(EncoderMismatchError, match="was built with encoder"):
        retrieval.open_index(tmp_path / "i").text_to_image("a dog", k=1)


def test_bad_requests(tmp_path, clip_index, small_collection, tiny_clip_dir):
    with pytest.raises(InputError, match="empty"):
        clip_index.text_to_image("   ")
    with pytest.raises(InputError, match="`k` must be an integer >= 1, got 0"):
        clip_index.image_to_caption(small_collection / "images" / "broken.jpg", k=0)
    with pytest.raises(retrieval.ImageDecodeError, match="broken.jpg"):
        clip_index.image_to_caption(small_collection / "images" / "broken.jpg")
    with pytest.raises(IndexFormatError, match="no such index"):
        retrieval.open_index(tmp_path / "nothing-here")
    with pytest.raises(InputError, match="not an index"):
        (tmp_path / "photos").mkdir()
        (tmp_path / "photos" / "keep.txt").write_text("mine")
        retrieval.build_index(
            captions=[small_collection / "captions.txt"],
            index=tmp_path / "photos",
            encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir)),
            embed=QUIET,
        )
    assert (tmp_path / "photos" / "keep.txt").read_text() == "mine"
    with pytest.raises(InputError, match="anchor set"):
        retrieval.build_index(
            captions=[small_collection / "captions.txt"],
            index=tmp_path / "x",
            encoders=EncoderChoice(image="efficientnet-lite0", text="minilm"),
        )
    with pytest.raises(InputError, match="either `EncoderChoice.clip`"):
        EncoderChoice(clip="open_clip:tiny", image="efficientnet-lite0")


def test_an_index_with_only_captions_refuses_text_to_image(tmp_path, tiny_clip_dir, small_collection):
    choice = EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")
    index = retrieval.build_index(
        captions=[small_collection / "captions.txt"], index=tmp_path / "c", encoders=choice, embed=QUIET
    )
    with pytest.raises(InputError, match="no images"):
        index.text_to_image("a horse")
    assert index.image_to_caption(Image.new("RGB", (40, 30), "red"), k=1)[0].caption
