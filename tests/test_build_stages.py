"""A build as three stages: gather_items -> embed_items -> write_index, each callable on its own.

Calling them by hand gives the index build_index gives; write_index takes vectors that no
encoder made (precomputed), and items whose bytes come from memory rather than files.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import COCO, require_shared_data

import retrieval
from retrieval import EmbedOptions, EncoderChoice, InputError
from retrieval.api.build import Collection, embed_items, gather_items
from retrieval.api.write import WriteOptions, write_index
from retrieval.asif.anchors import AnchorSet, AnchorSpaces
from retrieval.asif.relative import AsifParams
from retrieval.core.errors import EncoderMismatchError
from retrieval.embed.embedded import EmbeddedItems
from retrieval.embed.pipeline import ImageRow
from retrieval.encoders.registry import load_encoders
from retrieval.sources.items import CaptionRecord, ImageRef

QUIET = EmbedOptions(batch_size=3, workers=0, progress=False)
VOLATILE = {"created", "build", "build_id", "checksums", "manifest_sha256", "files", "errors_file", "vector_indexes"}


def _choice(tiny_clip_dir) -> EncoderChoice:
    return EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")


def _snapshot(path) -> dict:
    """Everything a build decides: items, errors, stored vectors, the manifest's stable part."""
    index = retrieval.open_index(path, device="cpu")
    files = index.manifest["files"]["vectors"]
    return {
        "items": {kind: index.items(kind) for kind in ("image", "caption")},
        "errors": index.errors(),
        "vectors": {key: np.concatenate([index.store.read_array(rel) for rel in rels]) for key, rels in files.items()},
        "manifest": {key: value for key, value in index.manifest.items() if key not in VOLATILE},
        "factories": {key: record["factory"] for key, record in index.info()["vector_indexes"].items()},
    }


def test_the_three_stages_by_hand_give_the_index_build_index_gives(tmp_path, tiny_clip_dir, small_collection):
    images, captions = [small_collection / "images"], [small_collection / "pairs.jsonl"]
    built = retrieval.build_index(
        images=images, captions=captions, index=tmp_path / "built", encoders=_choice(tiny_clip_dir), embed=QUIET
    )

    collection = gather_items(images, captions)
    image_encoder, text_encoder = load_encoders(_choice(tiny_clip_dir))
    embedded = embed_items(collection, image_encoder, text_encoder, QUIET)
    assert isinstance(embedded, EmbeddedItems) and embedded.shared_space
    assert len(embedded.image_ids) == 6 and len(embedded.caption_ids) == 30 and len(embedded.errors) == 1
    options = WriteOptions(
        sources={"images": [str(p) for p in images], "captions": [str(p) for p in captions]},
        checkpoint=str(tiny_clip_dir),
        progress=False,
    )
    assert write_index(embedded, tmp_path / "by-hand", options) == tmp_path / "by-hand"

    expected, got = _snapshot(built.path), _snapshot(tmp_path / "by-hand")
    assert got["items"] == expected["items"] and got["errors"] == expected["errors"]
    assert got["manifest"] == expected["manifest"] and got["factories"] == expected["factories"]
    assert got["vectors"].keys() == expected["vectors"].keys() == {"clip/image", "clip/caption"}
    for key, vectors in expected["vectors"].items():
        assert np.array_equal(got["vectors"][key], vectors), key


def _unit(rows: int, dim: int, seed: int, dtype=np.float32) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(dtype)


def _precomputed(
    dim: int, image_vectors: np.ndarray, caption_vectors: np.ndarray, shared: bool, record=None
) -> EmbeddedItems:
    record = record or {"spec": "precomputed:test", "dim": dim, "fingerprint": "0123456789abcdef"}
    images = [
        ImageRow(ImageRef(uri=f"shard-0.tar#{n:04d}.jpg", opener=bytes, source="shard-0.tar"))
        for n in range(len(image_vectors))
    ]
    captions = [
        CaptionRecord(text=f"caption {n}", source="captions.parquet", row=n) for n in range(len(caption_vectors))
    ]
    return EmbeddedItems(
        images=images,
        image_vectors=image_vectors,
        captions=captions,
        caption_vectors=caption_vectors,
        encoders={"image": record, "text": record},
        shared_space=shared,
    )


def test_write_takes_precomputed_vectors_in_one_space(tmp_path, tiny_clip_dir):
    image_encoder, _ = load_encoders(_choice(tiny_clip_dir))
    dim = image_encoder.dim
    record = {"spec": image_encoder.spec, "dim": dim, "fingerprint": image_encoder.fingerprint()}
    image_vectors, caption_vectors = _unit(40, dim, 1, np.float16), _unit(25, dim, 2)
    embedded = _precomputed(dim, image_vectors, caption_vectors, shared=True, record=record)
    write_index(embedded, tmp_path / "i", WriteOptions(checkpoint=str(tiny_clip_dir), progress=False))

    index = retrieval.open_index(tmp_path / "i", device="cpu")
    assert index.manifest["counts"] == {"image": 40, "caption": 25} and index.mode == "clip"
    assert index.items("image")["uri"][3] == "shard-0.tar#0003.jpg"
    assert index.items("image")["id"] == embedded.image_ids and index.items("image")["width"][0] == 0
    stored = index.store.read_array(index.manifest["files"]["vectors"]["clip/image"][0])
    assert np.array_equal(stored, image_vectors)  # float16 in, float16 stored, unchanged
    # each caption's nearest image is the one whose vector it is closest to
    scores, positions = index.search_vectors("image", caption_vectors[:5], "text", k=1)
    assert (
        positions[:, 0].tolist() == np.argmax(caption_vectors[:5] @ image_vectors.astype(np.float32).T, axis=1).tolist()
    )
    assert len(index.text_to_image("a dog", k=3)) == 3  # the recorded encoder answers text queries


def test_write_takes_precomputed_vectors_through_asif_anchors(tmp_path):
    dim = 12
    record = {"spec": "precomputed:test", "dim": dim, "fingerprint": "0123456789abcdef"}
    anchors = AnchorSet(
        "random", _unit(30, dim, 3), _unit(30, dim, 4), [f"anchor {n}" for n in range(30)], record, record
    )
    embedded = _precomputed(dim, _unit(20, dim, 5), _unit(10, dim, 6), shared=False, record=record)
    with pytest.raises(InputError, match="anchor set"):
        write_index(embedded, tmp_path / "none", WriteOptions(progress=False))
    options = WriteOptions(anchors=AnchorSpaces([anchors]), asif=AsifParams(k=8, p=2.0), progress=False)
    write_index(embedded, tmp_path / "i", options)
    index = retrieval.open_index(tmp_path / "i", device="cpu")
    assert index.mode == "asif" and index.routes == ["asif", "projected"]
    assert index.asif_params.k == 8 and index.relative_index("image").rows.shape[0] == 20
    _, positions = index.search_collection("caption", 3)
    assert positions.shape == (10, 3)

    other = dict(record, fingerprint="fedcba9876543210")
    stranger = AnchorSet("other", _unit(30, dim, 3), _unit(30, dim, 4), ["x"] * 30, other, record)
    with pytest.raises(EncoderMismatchError, match="image side"):
        write_index(embedded, tmp_path / "j", WriteOptions(anchors=AnchorSpaces([stranger]), progress=False))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: setattr(e, "image_vectors", e.image_vectors[:, :5]), "shape"),
        (lambda e: setattr(e, "caption_vectors", e.caption_vectors[1:]), "one row per caption"),
        (lambda e: setattr(e, "image_vectors", e.image_vectors.astype(np.float64)), "float32 or float16"),
        (lambda e: e.image_vectors.__setitem__((0, 0), np.nan), "NaN"),
        (lambda e: e.encoders.__setitem__("text", {"spec": "x"}), "spec, dim and fingerprint"),
    ],
)
def test_write_refuses_vectors_that_do_not_fit(tmp_path, change, message):
    embedded = _precomputed(8, _unit(4, 8, 7), _unit(3, 8, 8), shared=True)
    change(embedded)
    with pytest.raises(InputError, match=message):
        write_index(embedded, tmp_path / "i", WriteOptions(progress=False))
    assert not (tmp_path / "i" / "manifest.json").exists()


def test_a_build_from_in_memory_items(tmp_path, tiny_clip_dir):
    """Image bytes held in a dict (no file paths), one of them undecodable: skipped and reported."""
    require_shared_data()
    photos = sorted((COCO / "images").glob("*.jpg"))[:5]
    blobs = {f"mem://coco/{p.name}": p.read_bytes() for p in photos}
    blobs["mem://coco/broken.jpg"] = b"\xff\xd8 this is no JPEG"
    refs = [
        ImageRef(uri=uri, opener=functools.partial(blobs.__getitem__, uri), source="memory", version=len(data))
        for uri, data in blobs.items()
    ]
    captions = [CaptionRecord(text="a photo", source="memory", row=1)]
    image_encoder, text_encoder = load_encoders(_choice(tiny_clip_dir))
    embedded = embed_items(Collection(images=refs, captions=captions), image_encoder, text_encoder, QUIET)
    assert [e.path for e in embedded.errors] == ["mem://coco/broken.jpg"]
    write_index(embedded, tmp_path / "i", WriteOptions(progress=False))

    index = retrieval.open_index(tmp_path / "i", device="cpu")
    assert index.items("image")["uri"] == [f"mem://coco/{p.name}" for p in photos]
    assert [e["path"] for e in index.errors()] == ["mem://coco/broken.jpg"]
    # the same photos as files: the same vectors (ids differ: they name other places)
    from_files = embed_items(
        Collection(images=[ImageRef(path=p, source="files") for p in photos]), image_encoder, text_encoder, QUIET
    )
    assert np.array_equal(from_files.image_vectors, embedded.image_vectors)
    assert [r.sha256 for r in from_files.images] == [r.sha256 for r in embedded.images]


@pytest.mark.parametrize(
    "call, message",
    [  # a Python caller never typed the command line's flags: errors name the parameters and fields it set
        (lambda: gather_items([], []), "nothing to index: give `images` and/or `captions`"),
        (lambda: EncoderChoice(clip="c", image="i"), "give either `EncoderChoice.clip` (a contrastive model) or"),
        (lambda: retrieval.IndexOptions(target_recall=2), "`IndexOptions.target_recall` must be in (0, 1], got 2"),
        (lambda: EmbedOptions(decode="fpga"), "`EmbedOptions.decode` must be one of auto, cpu, gpu, got 'fpga'"),
        (lambda: retrieval.BuildOptions(image_views="ten"), "`BuildOptions.image_views` must be one of none, five"),
        (lambda: retrieval.remove_from_index("/no/such/index"), "nothing to remove: give `ids` and/or `paths`"),
        (
            lambda: retrieval.build_anchors([], "/no/such/anchors", EncoderChoice(clip="open_clip:tiny")),
            "give `EncoderChoice.image` and `EncoderChoice.text`, not `EncoderChoice.clip`",
        ),
        (
            lambda: retrieval.build_index(
                captions=["x.txt"], index="/no/such/index", encoders=EncoderChoice(image="i", text="t")
            ),
            "need an anchor set for cross-modal search: `anchors`",
        ),
    ],
)
def test_errors_name_the_parameters_not_the_flags(call, message):
    with pytest.raises(InputError) as info:
        call()
    assert message in str(info.value) and "--" not in str(info.value)
