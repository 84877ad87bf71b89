"""Item metadata (a source's own fields, e.g. img2dataset's json) kept in the index and returned with hits:
Python API, CLI --json, the HTTP server (/api/v1 and clip back's metadata), add/remove, and indexes
written before the metadata column existed."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import COCO, coco_pairs, require_shared_data
from serve_helpers import make_client

import retrieval
from retrieval import EmbedOptions, EncoderChoice
from retrieval.api import write as write_stage
from retrieval.api.build import Collection, embed_items
from retrieval.api.write import WriteOptions, write_index
from retrieval.cli.main import main
from retrieval.encoders.registry import load_encoders
from retrieval.sources.items import CaptionRecord, ImageRef
from retrieval.store.item_metadata import append_rows, decode_metadata, encode_metadata

QUIET = EmbedOptions(batch_size=4, workers=0, progress=False)


def _json_of(n: int) -> dict:
    """img2dataset's json fields of sample ``n``."""
    return {
        "url": f"http://127.0.0.1:8000/photo-{n}.jpg",
        "key": f"{n:09d}",
        "width": 640,
        "height": 480,
        "sha256": "ab" * 32,
        "status": "success",
        "error_message": None,
    }


def _collection(root) -> Collection:
    """Three COCO photos as files and one as bytes in memory, each with its json; a caption per photo."""
    require_shared_data()
    pairs = coco_pairs(4)
    names = list(dict.fromkeys(row["image"] for row in pairs))
    images, captions = [], []
    for n, name in enumerate(names):
        if n < 3:
            path = (root / f"photo-{n}.jpg").resolve()
            shutil.copy(COCO / name, path)
            ref = ImageRef(path=path, source="test", metadata=_json_of(n))
            pair = path
        else:
            data = (COCO / name).read_bytes()
            ref = ImageRef(
                uri="shards/00000.tar#000000003", opener=lambda data=data: data, source="test", metadata=_json_of(n)
            )
            pair = ref.location
        images.append(ref)
        caption = next(row["caption"] for row in pairs if row["image"] == name)
        captions.append(CaptionRecord(text=caption, source="shards", row=n, image=pair, metadata=_json_of(n)))
    captions.append(CaptionRecord(text="a plate of food", source="plain.txt", row=0))  # no metadata at all
    return Collection(images=images, captions=captions)


def _build(tmp_path, tiny_clip_dir, name: str = "index"):
    collection = _collection(tmp_path)
    image_encoder, text_encoder = load_encoders(
        EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")
    )
    embedded = embed_items(collection, image_encoder, text_encoder, QUIET)
    return write_index(
        embedded, tmp_path / name, WriteOptions(checkpoint=str(tiny_clip_dir), progress=False)
    ), collection


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_clip_dir):
    return _build(tmp_path_factory.mktemp("metadata"), tiny_clip_dir)


def test_hits_carry_each_items_metadata(built):
    path, collection = built
    index = retrieval.open_index(path, device="cpu")
    by_id = {ref.id: dict(ref.metadata) for ref in collection.images}
    hits = index.text_to_image("a photo", k=10)
    assert len(hits) == 4
    for hit in hits:
        assert hit.metadata == by_id[hit.id]
        assert hit.to_dict()["metadata"]["url"] == by_id[hit.id]["url"]
    captions = {hit.caption: hit for hit in index.text_to_caption("a photo", k=10)}
    assert captions["a plate of food"].metadata == {}
    paired = [hit for hit in captions.values() if hit.image_uri == "shards/00000.tar#000000003"]
    assert len(paired) == 1 and paired[0].metadata["key"] == "000000003"
    same = index.image_to_image(str(collection.images[0].path), k=1)[0]
    assert same.id == collection.images[0].id and same.metadata["url"].endswith("photo-0.jpg")


def test_cli_json_carries_metadata(built):
    path, collection = built
    result = CliRunner().invoke(
        main, ["text-to-image", "a photo", "--index", str(path), "-k", "4", "--json", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(rows) == 4 and {row["metadata"]["key"] for row in rows} == {f"{n:09d}" for n in range(4)}
    result = CliRunner().invoke(
        main, ["text-to-caption", "food", "--index", str(path), "-k", "5", "--json", "--device", "cpu"]
    )
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert (
        sum(1 for row in rows if row["metadata"] == {}) == 1 and sum(1 for row in rows if "url" in row["metadata"]) == 4
    )


def test_server_returns_url_from_the_metadata(built):
    path, _ = built
    index = retrieval.open_index(path, device="cpu")
    uris = index.items("image")["uri"]
    with make_client(("meta", path)) as client:
        body = client.post("/api/v1/search", json={"queries": [{"text": "a photo"}], "k": 4}).json()
        hits = body["results"][0]["hits"] if "results" in body else body[0]["hits"]
        for hit in hits:
            assert hit["url"] == hit["metadata"]["url"] and hit["metadata"]["key"] == f"{int(hit['url'][-5]):09d}"
        item = client.get("/api/v1/items/image/0?index=meta").json()
        assert item["url"] == item["metadata"]["url"] and isinstance(item["metadata"], dict)
        rows = client.post("/metadata", content=json.dumps({"ids": [0, 1, 2, 3], "indice_name": "meta"})).json()
        for row in rows:
            meta = row["metadata"]
            assert meta["url"].startswith("http://127.0.0.1:8000/photo-") and meta["image_path"] == uris[row["id"]]
            assert meta["sha256"] == "ab" * 32 and meta["width"] == 640
        knn = {"text": "a photo", "modality": "image", "num_images": 4, "num_result_ids": 4, "indice_name": "meta"}
        results = client.post("/knn-service", content=json.dumps(knn)).json()
        assert len(results) == 4 and all(r["url"].startswith("http://127.0.0.1:8000/") for r in results)


def test_add_and_remove_keep_the_metadata_of_surviving_rows(tmp_path, tiny_clip_dir):
    path, collection = _build(tmp_path, tiny_clip_dir)
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(COCO / coco_pairs(6)[-1]["image"], extra / "new.jpg")
    retrieval.add_to_index(path, images=[extra], embed=QUIET, device="cpu")
    retrieval.remove_from_index(path, ids=[collection.images[1].id, collection.images[2].id])
    index = retrieval.open_index(path, device="cpu")
    found = {hit.id: hit.metadata for hit in index.text_to_image("a photo", k=10)}
    assert found == {
        collection.images[0].id: _json_of(0),
        collection.images[3].id: _json_of(3),
        index.items("image")["id"][-1]: {},
    }


def _without_metadata(make_table):
    def old_table(rows):
        table = make_table(rows)
        return table.drop_columns(["metadata"])

    return old_table


def test_an_index_written_before_the_metadata_column_still_opens_and_updates(tmp_path, tiny_clip_dir, monkeypatch):
    with monkeypatch.context() as patch:  # the items tables as the previous version wrote them
        patch.setattr(write_stage, "image_table", _without_metadata(write_stage.image_table))
        patch.setattr(write_stage, "caption_table", _without_metadata(write_stage.caption_table))
        path, collection = _build(tmp_path, tiny_clip_dir)
    index = retrieval.open_index(path, device="cpu")
    assert "metadata" not in index.items("image")
    assert all(hit.metadata == {} for hit in index.text_to_image("a photo", k=4))
    with make_client(("old", path)) as client:
        hits = client.post("/api/v1/search", json={"queries": [{"text": "a photo"}], "k": 2}).json()
        hits = hits["results"][0]["hits"] if "results" in hits else hits[0]["hits"]
        assert all(hit["url"] is None and hit["metadata"] == {} for hit in hits)
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(COCO / coco_pairs(6)[-1]["image"], extra / "new.jpg")
    retrieval.add_to_index(path, images=[extra], embed=QUIET, device="cpu")
    index = retrieval.open_index(path, device="cpu")
    assert len(index.items("image")["metadata"]) == 5 and all(
        hit.metadata == {} for hit in index.text_to_image("a photo", k=5)
    )


def test_metadata_encoding_edge_cases():
    import numpy as np

    assert encode_metadata(None) is None and encode_metadata({}) is None
    stored = encode_metadata({"w": np.int64(3), "score": float("nan"), "raw": b"\x00\x01", "tags": np.array([1, 2])})
    assert decode_metadata(stored) == {"w": 3, "score": None, "raw": "<2 bytes>", "tags": [1, 2]}
    assert decode_metadata("not json") == {} and decode_metadata("[1]") == {} and decode_metadata(None) == {}
    old = pa.table({"id": ["a"], "uri": ["x"]})
    new = pa.table({"id": ["b"], "uri": ["y"], "metadata": pa.array(['{"k": 1}'], pa.string())})
    merged = append_rows(old, new)
    assert merged.to_pydict() == {"id": ["a", "b"], "uri": ["x", "y"], "metadata": [None, '{"k": 1}']}


def test_hit_types_stay_compatible():
    """Positional construction as before, hashable as before; metadata defaults to an empty dict."""
    from retrieval.core.hits import CaptionHit, ImageHit

    plain = ImageHit(1, 0.5, "img-1", "a.jpg", 10, 20)
    rich = ImageHit(1, 0.5, "img-1", "a.jpg", 10, 20, metadata={"url": "http://x/a.jpg"})
    assert plain.metadata == {} and plain.kind == "image" and len({plain, rich}) == 2 and hash(plain) == hash(rich)
    caption = CaptionHit(2, 0.25, "cap-1", "a dog", "caps.txt", "a.jpg")
    assert caption.to_dict() == {
        "rank": 2,
        "score": 0.25,
        "id": "cap-1",
        "caption": "a dog",
        "source": "caps.txt",
        "image_uri": "a.jpg",
        "kind": "caption",
        "metadata": {},
    }
