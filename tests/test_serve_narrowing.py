"""/api/v1/search takes what the CLI and the Index API take: where, min_score, offset, dedup, and
plus/minus parts; each answers what the Python API answers for the same request."""

from __future__ import annotations

import numpy as np
import pytest
from serve_helpers import b64, make_client, tiny_index  # noqa: F401  (tiny_index is a fixture)

from retrieval.api.dedup import DEFAULT_THRESHOLD
from retrieval.core.query import Query
from retrieval.core.search import SearchOptions


@pytest.fixture(scope="module")
def client(tiny_index):  # noqa: F811
    with make_client(("tiny", tiny_index)) as c:
        yield c


@pytest.fixture(scope="module")
def index(client):
    return client.app.state.served.get("tiny").snapshot().index


def ids(body: dict, query: int = 0) -> list[str]:
    return [hit["id"] for hit in body["results"][query]["hits"]]


def api_ids(index, hits, kind: str) -> list:
    table = index.items(kind)
    return [table["id"].index(hit.id) for hit in hits]


def search(client, **body) -> dict:
    response = client.post("/api/v1/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_where_min_score_and_offset_answer_as_the_python_api(client, index):
    table = index.items("caption")
    where = f"image_uri <> '{table['image_uri'][0]}'"
    expected = index.text_to_caption("a plate of food", k=4, options=SearchOptions(where=where, offset=2))
    body = search(client, queries=[{"text": "a plate of food"}], target="caption", k=4, where=where, offset=2)
    positions = [int(i) for i in ids(body)]  # /api/v1 ids are row positions
    assert positions == api_ids(index, expected, "caption") and len(positions) == 4
    assert all(table["image_uri"][p] != table["image_uri"][0] for p in positions)
    assert [hit["score"] for hit in body["results"][0]["hits"]] == pytest.approx([h.score for h in expected], abs=1e-5)
    full = index.text_to_caption("a plate of food", k=6, options=SearchOptions(where=where))
    cut = full[2].score
    body = search(client, queries=[{"text": "a plate of food"}], target="caption", k=6, where=where, min_score=cut)
    assert [hit["score"] for hit in body["results"][0]["hits"]] == pytest.approx([h.score for h in full[:3]], abs=1e-5)
    bad = client.post("/api/v1/search", json={"queries": [{"text": "a"}], "where": "no_such_column = 1"})
    assert bad.status_code == 422 and "no_such_column" in bad.json()["error"]
    bad = client.post("/api/v1/search", json={"queries": [{"text": "a"}], "route": "nope"})  # the body's field names
    assert bad.status_code == 422
    assert bad.json()["error"] == "route must be one of clip, asif, projected, unimodal, got 'nope'"
    bad = client.post("/api/v1/search", json={"queries": [{"text": "a"}], "route": "asif"})  # a CLIP index
    assert bad.status_code == 422
    assert bad.json()["error"] == "index tiny: route 'asif' not available; text -> image in this index answers by clip"


def test_plus_minus_parts_and_dedup_answer_as_the_python_api(client, index, small_collection):
    photo = sorted((small_collection / "images").glob("0*.jpg"))[0]
    query = Query.text("a plate of food") + 0.5 * Query.image(photo) - Query.text("a horse")
    expected = index.search(query, target="image", k=3)
    body = search(
        client,
        queries=[
            {"text": "a plate of food", "plus": [{"image": b64(photo), "weight": 0.5}], "minus": [{"text": "a horse"}]}
        ],
        k=3,
    )
    assert [int(i) for i in ids(body)] == api_ids(index, expected, "image")  # image ids are row positions
    assert [hit["score"] for hit in body["results"][0]["hits"]] == pytest.approx([h.score for h in expected], abs=1e-4)
    kept = index.search(
        Query.text("a plate of food"), target="image", k=20, options=SearchOptions(dedup=DEFAULT_THRESHOLD)
    )
    body = search(client, queries=[{"text": "a plate of food"}], k=20, dedup=True)
    assert [hit["score"] for hit in body["results"][0]["hits"]] == pytest.approx([h.score for h in kept], abs=1e-5)
    # dedup against a numpy reference, at a threshold that must drop some: every image ranked, then each dropped
    # when its stored vector's cosine to a better kept one reaches the threshold
    everything = index.rows("image")
    ranked = api_ids(index, index.text_to_image("a plate of food", k=everything), "image")
    stored = np.asarray(index.store.read_vectors(index.manifest["files"]["vectors"]["clip/image"]), np.float32)
    unit = stored[ranked] / np.linalg.norm(stored[ranked], axis=1, keepdims=True)
    cosines = unit @ unit.T
    threshold = round(float(np.median(cosines[np.triu_indices(len(ranked), 1)])), 4)
    survivors: list[int] = []
    for i in range(len(ranked)):
        if all(cosines[i, j] < threshold for j in survivors):
            survivors.append(i)
    assert len(survivors) < len(ranked)  # the threshold drops some, so a dedup that drops nothing fails
    body = search(client, queries=[{"text": "a plate of food"}], k=everything, dedup=threshold)
    assert [int(i) for i in ids(body)] == [ranked[i] for i in survivors]
    for bad in (
        {"queries": [{"vector": [0.1] * 8, "plus": [{"text": "x"}]}]},
        {"queries": [{"text": "a", "minus": [{"text": "b", "weight": -1}]}]},
        {"queries": [{"text": "a"}], "dedup": 3},
    ):
        assert client.post("/api/v1/search", json=bad).status_code == 422
