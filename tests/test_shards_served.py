"""Shards end to end: img2dataset's json fields, stored with each item, come back in Python hits and over
HTTP (``url`` in clip back's answers and /api/v1 hits), and the server makes thumbnails of shard members."""

from __future__ import annotations

import io

import pytest
from conftest import require_shared_data
from PIL import Image
from serve_helpers import make_client
from test_sources_shards import QUIET, coco_samples, write_shards

import retrieval
from retrieval import EncoderChoice


@pytest.fixture(scope="module")
def shard_index(tmp_path_factory, tiny_clip_dir):
    require_shared_data()
    root = tmp_path_factory.mktemp("served-shards")
    samples = coco_samples(12)
    shards = write_shards(root / "shards", samples, per_shard=5)
    retrieval.build_index(
        images=[str(shards / "{00000..00002}.tar")],
        index=root / "index",
        embed=QUIET,
        encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
    )
    return root / "index", {s["key"]: s["json"]["url"] for s in samples}


def test_hits_carry_the_json_fields_of_their_sample(shard_index):
    path, url_of = shard_index
    index = retrieval.open_index(path, device="cpu")
    for hit in index.text_to_image("a man riding a horse", k=5):
        key = hit.uri.rpartition("#")[2]
        assert hit.metadata["url"] == url_of[key] and hit.metadata["key"] == key
    for hit in index.text_to_caption("a man riding a horse", k=5):
        assert hit.metadata["url"] == url_of[hit.metadata["key"]]


def test_the_server_returns_urls_and_thumbnails_of_shard_members(shard_index):
    path, url_of = shard_index
    with make_client(("shards", path)) as client:
        body = client.post("/api/v1/search", json={"queries": [{"text": "a plate of food"}], "k": 4}).json()
        hits = body["results"][0]["hits"]
        assert [h["url"] for h in hits] == [url_of[h["uri"].rpartition("#")[2]] for h in hits]
        thumb = client.get(hits[0]["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
        knn = client.post(
            "/knn-service", content='{"text": "a plate of food", "modality": "image", "num_images": 3}'
        ).json()
        assert len(knn) == 3 and all(r["url"] in url_of.values() and r["image"] for r in knn)
