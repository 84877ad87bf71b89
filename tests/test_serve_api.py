"""The HTTP app in-process (FastAPI's TestClient) over a tiny CLIP index: /api/v1, clip-back compat, CORS, the key,
limits."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from serve_helpers import b64, make_client, tiny_index  # noqa: F401  (tiny_index is a fixture)

from retrieval.serve.records import CAPTION_BASE

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def client(tiny_index):  # noqa: F811
    with make_client(("tiny", tiny_index), ("again", tiny_index)) as c:
        yield c


@pytest.fixture(scope="module")
def index(client):
    return client.app.state.served.get("tiny").snapshot().index


def photo(small_collection):
    return sorted((small_collection / "images").glob("0*.jpg"))[0]


def test_indexes_and_info(client, index):
    body = client.get("/api/v1/indexes").json()
    assert body["default"] == "tiny" and [i["name"] for i in body["indexes"]] == ["tiny", "again"]
    first = body["indexes"][0]
    assert (first["mode"], first["images"], first["captions"]) == ("clip", 6, 32)
    assert first["build"] == index.manifest["build_id"] and first["routes"]["text_to_image"] == ["clip"]
    info = client.get("/api/v1/indexes/tiny").json()
    assert info["counts"] == {"image": 6, "caption": 32} and info["name"] == "tiny" and "path" not in info
    assert client.get("/api/v1/indexes/nope").status_code == 404
    assert client.get("/healthz").json() == {
        "status": "ok",
        "indexes": {"tiny": index.manifest["build_id"], "again": index.manifest["build_id"]},
    }


def test_text_search_matches_the_python_api(client, index):
    body = client.post(
        "/api/v1/search", json={"queries": [{"text": "a plate of food"}, {"text": "a horse"}], "k": 4}
    ).json()
    assert body["index"] == "tiny" and [r["query"] for r in body["results"]] == [0, 1]
    for text, result in zip(["a plate of food", "a horse"], body["results"], strict=True):
        expected = index.text_to_image(text, k=4)
        hits = result["hits"]
        assert result["route"] == "clip" and [h["rank"] for h in hits] == [1, 2, 3, 4]
        assert [h["uri"] for h in hits] == [h.uri for h in expected]
        assert [index.items("image")["id"][h["id"]] for h in hits] == [h.id for h in expected]  # id = row position
        assert all(h["thumbnail"] == f"/api/v1/thumbnails/{h['id']}?index=tiny" for h in hits)
        captions_by_uri: dict[str, str] = {}
        caption_items = index.items("caption")
        for uri, text_ in zip(caption_items["image_uri"], caption_items["caption"], strict=True):
            captions_by_uri.setdefault(uri, text_)
        assert [h["caption"] for h in hits] == [captions_by_uri.get(h["uri"]) for h in hits]  # an image's first caption
    captions = client.post(
        "/api/v1/search", json={"queries": [{"text": "a plate of food"}], "target": "caption", "k": 3}
    ).json()
    assert [h["caption"] for h in captions["results"][0]["hits"]] == [
        h.caption for h in index.text_to_caption("a plate of food", k=3)
    ]


def test_image_item_and_vector_queries(client, index, small_collection):
    picture = photo(small_collection)
    body = client.post(
        "/api/v1/search", json={"queries": [{"image": b64(picture)}], "target": "caption", "k": 3}
    ).json()
    assert [h["caption"] for h in body["results"][0]["hits"]] == [
        h.caption for h in index.image_to_caption(picture, k=3)
    ]
    data_url = "data:image/jpeg;base64," + b64(picture)
    same = client.post("/api/v1/search", json={"queries": [{"image": data_url}], "target": "image", "k": 2}).json()
    position = index.items("image")["uri"].index(str(picture.resolve()))
    assert same["results"][0]["hits"][0]["id"] == position
    like = client.post("/api/v1/search", json={"queries": [{"item": {"kind": "image", "id": position}}], "k": 3}).json()
    assert position not in [h["id"] for h in like["results"][0]["hits"]] and len(like["results"][0]["hits"]) == 3
    with_self = client.post(
        "/api/v1/search", json={"queries": [{"item": {"kind": "image", "id": position}}], "k": 3, "exclude_self": False}
    ).json()
    assert with_self["results"][0]["hits"][0]["id"] == position
    stored = index.vector_source("clip/image").take(np.array([position]))[0]
    by_vector = client.post("/api/v1/search", json={"queries": [{"vector": stored.tolist()}], "k": 1}).json()
    assert by_vector["results"][0]["hits"][0]["id"] == position


def test_items_and_thumbnails(client, index):
    item = client.get("/api/v1/items/caption/0?index=tiny").json()
    assert item["id"] == 0 and item["kind"] == "caption" and item["caption"] == index.items("caption")["caption"][0]
    assert item["item_id"] == index.items("caption")["id"][0]
    response = client.get("/api/v1/thumbnails/1?index=tiny&size=64")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(response.content)).size) == 64
    for path in [
        "/api/v1/thumbnails/99",
        "/api/v1/thumbnails/-1",
        "/api/v1/thumbnails/..%2F..%2Fetc%2Fpasswd",
        "/api/v1/thumbnails/%2Fetc%2Fpasswd",
        "/api/v1/items/image/999999999999999999999",
        "/api/v1/items/..%2Fimage/1",
        "/api/v1/thumbnails/1?index=..%2F..",
        "/page/..%2F..%2Fpyproject.toml",
    ]:
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.headers["access-control-allow-origin"] == "*"
    assert client.get("/api/v1/thumbnails/1?size=100000").status_code == 422


def test_search_bad_input_is_4xx_with_a_message(client):
    cases = [
        (b"{not json", 400),
        (b"[1, 2]", 422),
        (b"", 400),
        (b"\xff\xfe", 400),
        (json.dumps({"queries": []}).encode(), 422),
        (json.dumps({"queries": [{"text": "x"}], "k": 10**9}).encode(), 422),
        (json.dumps({"queries": [{"text": "x"}], "k": "ten"}).encode(), 422),
        (json.dumps({"queries": [{"text": "x", "image": "eA=="}]}).encode(), 422),
        (json.dumps({"queries": [{"image": "not base64!!"}]}).encode(), 422),
        (json.dumps({"queries": [{"image": base64.b64encode(b"no image here").decode()}]}).encode(), 422),
        (json.dumps({"queries": [{"vector": [1.0, 2.0]}]}).encode(), 422),
        (json.dumps({"queries": [{"item": {"kind": "image", "id": 10**6}}]}).encode(), 404),
        (json.dumps({"queries": [{"item": {"kind": "../etc", "id": 1}}]}).encode(), 422),
        (json.dumps({"queries": [{"text": "x"}], "route": "asif"}).encode(), 422),
        (json.dumps({"queries": [{"text": "x"}], "nprobe": -3}).encode(), 422),
        (json.dumps({"queries": [{"text": "x"}], "index": "/etc"}).encode(), 404),
        (json.dumps({"queries": [{"text": "   "}]}).encode(), 422),
    ]
    for body, status in cases:
        response = client.post("/api/v1/search", content=body)
        assert response.status_code == status, (body[:80], response.text)
        assert isinstance(response.json()["error"], str) and response.headers["access-control-allow-origin"] == "*"


def test_decompression_bomb_is_refused(client):
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")  # 144 M pixels in a small file
    response = client.post("/api/v1/search", json={"queries": [{"image": base64.b64encode(bomb.getvalue()).decode()}]})
    assert response.status_code == 422 and "bomb" in response.json()["error"]


def test_knn_service_answers_like_clip_back(client, index):
    body = {
        "text": "a plate of food",
        "image": None,
        "image_url": None,
        "embedding_input": None,
        "modality": "image",
        "num_images": 2,
        "num_result_ids": 5,
        "indice_name": "",
        "use_mclip": False,
        "deduplicate": False,
        "use_safety_model": True,
        "use_violence_detector": True,
        "aesthetic_score": "",
        "aesthetic_weight": "0.5",
    }
    response = client.post(
        "/knn-service", content=json.dumps(body), headers={"content-type": "text/plain;charset=UTF-8"}
    )
    assert response.status_code == 200, response.text
    results = response.json()
    expected = index.text_to_image("a plate of food", k=5)
    assert [r["id"] for r in results] == [index.items("image")["id"].index(h.id) for h in expected]
    assert [r["similarity"] for r in results] == pytest.approx([h.score for h in expected], abs=1e-6)
    assert (
        set(results[0]) >= {"image_path", "image", "id", "similarity"} and results[0]["image_path"] == expected[0].uri
    )
    Image.open(io.BytesIO(base64.b64decode(results[0]["image"]))).verify()
    assert all(set(r) == {"id", "similarity"} for r in results[2:])
    captions = client.post("/knn-service", content=json.dumps({**body, "modality": "text", "num_images": "3"})).json()
    assert all(r["id"] >= CAPTION_BASE and r["id"] < 2**53 for r in captions) and "caption" in captions[0]
    # precedence: text over image; an empty text falls through to the image
    by_image = client.post(
        "/knn-service", content=json.dumps({**body, "text": "", "image": b64(index.items("image")["uri"][0])})
    ).json()
    assert by_image[0]["id"] == 0


def test_knn_service_embedding_and_dedup(client, index):
    stored = index.vector_source("clip/image").take(np.array([3]))[0]
    body = {"embedding_input": stored.tolist(), "modality": "image", "num_images": 6, "indice_name": "tiny"}
    plain = client.post("/knn-service", content=json.dumps(body)).json()
    assert plain[0]["id"] == 3 and len(plain) == 6 and len({r["id"] for r in plain}) == 6
    deduped = client.post("/knn-service", content=json.dumps({**body, "deduplicate": True})).json()
    vectors = index.vector_source("clip/image").take(np.array([r["id"] for r in plain]))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    kept = []
    for row in range(len(plain)):
        if not kept or max(vectors[kept] @ vectors[row]) < 0.94:
            kept.append(row)
    assert [r["id"] for r in deduped] == [plain[row]["id"] for row in kept]
    huge = client.post("/knn-service", content=json.dumps({**body, "num_images": 10**12})).json()
    assert len(huge) == 6  # capped at max_k, then the 6 images there are
    assert client.post("/knn-service", content=json.dumps({**body, "num_images": 0})).json() == []


def test_knn_service_bad_input(client):
    for body in [
        b"nope",
        b"{}",
        json.dumps({"text": 5}).encode(),
        json.dumps({"image": "%%%"}).encode(),
        json.dumps({"embedding_input": [1, 2, 3]}).encode(),
        json.dumps({"embedding_input": "x"}).encode(),
        json.dumps({"text": "a", "num_images": -1}).encode(),
        json.dumps({"text": "a", "indice_name": "x/../y"}).encode(),
        json.dumps({"image_url": "http://127.0.0.1/x.jpg"}).encode(),
    ]:
        response = client.post("/knn-service", content=body)
        assert 400 <= response.status_code < 500 and "error" in response.json(), (body, response.text)


def test_metadata_indices_list_and_config(client, index):
    response = client.post(
        "/metadata", content=json.dumps({"ids": [1, CAPTION_BASE + 2, -1, 10**30, 0], "indice_name": None})
    )
    rows = response.json()
    assert [r["id"] for r in rows] == [1, CAPTION_BASE + 2, -1, 10**30, 0]
    assert rows[0]["metadata"]["image_path"] == index.items("image")["uri"][1] and "image" in rows[0]["metadata"]
    assert rows[1]["metadata"]["caption"] == index.items("caption")["caption"][2]
    assert rows[2]["metadata"] is None and rows[3]["metadata"] is None
    assert client.post("/metadata", content=json.dumps({"ids": [], "indice_name": "tiny"})).json() == []
    for bad in [{"ids": ["../../etc/passwd"]}, {"ids": "1"}, {"ids": [True]}, {"ids": [1.5]}]:
        assert client.post("/metadata", content=json.dumps(bad)).status_code == 422
    assert client.get("/indices-list").json() == ["tiny", "again"]
    config = client.get("/config.json").json()
    assert config == {"defaultBackend": "http://testserver", "defaultIndex": "tiny", "urlColumn": "url"}


def test_cors_on_everything_and_options(client):
    for method, path in [
        ("GET", "/api/v1/indexes"),
        ("GET", "/nowhere"),
        ("POST", "/knn-service"),
        ("GET", "/metrics"),
    ]:
        response = client.request(method, path, headers={"Origin": "http://elsewhere.example"})
        assert response.headers["access-control-allow-origin"] == "*", path
    preflight = client.options(
        "/knn-service",
        headers={
            "Origin": "http://x",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 204 and "POST" in preflight.headers["access-control-allow-methods"]
    assert client.options("/api/v1/search").status_code == 204


def test_metrics_and_openapi(client):
    client.get("/api/v1/indexes")
    client.get("/api/v1/items/image/12345")
    text = client.get("/metrics").text
    assert 'retrieval_http_requests_total{method="GET",route="/api/v1/indexes",status="200"}' in text
    assert 'retrieval_http_errors_total{route="/api/v1/items/{kind}/{item_id}",status="404"}' in text
    assert "retrieval_http_request_seconds_bucket" in text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/search", "/knn-service", "/metadata", "/api/v1/thumbnails/{item_id}"} <= set(paths)


def test_api_key(tiny_index):  # noqa: F811
    with make_client(("tiny", tiny_index), api_key="s3cret", warm=False) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/").status_code == 200
        denied = c.get("/api/v1/indexes")
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "*"
        assert c.post("/knn-service", content=b"{}").status_code == 401
        assert c.get("/api/v1/indexes", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/v1/indexes", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/api/v1/thumbnails/0?key=s3cret").status_code == 200
        assert c.options("/knn-service").status_code == 204  # preflights carry no credentials


def test_body_limit_refuses_early(tiny_index):  # noqa: F811
    with make_client(("tiny", tiny_index), max_body_bytes=4096, warm=False) as c:
        declared = c.post("/knn-service", content=b"x" * 5000)
        assert declared.status_code == 413 and "error" in declared.json()

        def chunks():
            for _ in range(100):
                yield b"y" * 1024

        streamed = c.post("/api/v1/search", content=chunks())  # no Content-Length: counted as it arrives
        assert streamed.status_code == 413 and "error" in streamed.json()
        assert declared.headers["access-control-allow-origin"] == "*"
        assert streamed.headers["access-control-allow-origin"] == "*"  # refused mid-stream, still with CORS
        assert c.post("/api/v1/search", json={"queries": [{"text": "ok"}], "k": 1}).status_code == 200


def test_page_note_without_the_page(tiny_index, tmp_path):  # noqa: F811
    with make_client(("tiny", tiny_index), page_dir=tmp_path / "missing", warm=False) as c:
        response = c.get("/")
        assert response.status_code == 200 and "page is not installed" in response.text
    (tmp_path / "page").mkdir()
    (tmp_path / "page" / "index.html").write_text("<p>hello page</p>")
    (tmp_path / "page" / "app.js").write_text("console.log(1)")
    with make_client(("tiny", tiny_index), page_dir=tmp_path / "page", warm=False) as c:
        assert c.get("/").text == "<p>hello page</p>" and c.get("/page/app.js").status_code == 200
