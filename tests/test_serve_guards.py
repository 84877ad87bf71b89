"""The server's guards: image_url fetching (SSRF) and hypothesis fuzzing of the request bodies (never a 5xx)."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serve_helpers import make_client, tiny_index  # noqa: F401  (tiny_index is a fixture)

from retrieval.serve.errors import ApiError
from retrieval.serve.fetch import FetchPolicy, fetch_image_url, is_public


@pytest.fixture(scope="module")
def image_host():
    """A local http.server on 127.0.0.1 serving one JPEG at /cat.jpg (and 2 MB of junk at /big)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="JPEG")
    jpeg, hits = buffer.getvalue(), []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = jpeg if self.path == "/cat.jpg" else b"\0" * (2 << 20)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def test_addresses_judged_public_or_not():
    assert is_public("93.184.216.34") and is_public("2606:2800:220:1:248:1893:25c8:1946")
    for address in [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "172.16.5.5",
        "169.254.169.254",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "fd00::1",
        "100.64.0.1",
        "224.0.0.1",
    ]:
        assert not is_public(address), address


def test_image_url_is_off_by_default_and_refuses_private_addresses(image_host):
    base, hits = image_host
    with pytest.raises(ApiError) as off:
        fetch_image_url(f"{base}/cat.jpg", FetchPolicy())
    assert off.value.status == 403 and "`allow_image_urls`" in off.value.message
    for url in [
        f"{base}/cat.jpg",
        "http://localhost:9/x",
        "http://[::1]:9/x",
        "http://169.254.169.254/latest/meta-data",
    ]:
        with pytest.raises(ApiError) as refused:
            fetch_image_url(url, FetchPolicy(allow=True))
        assert refused.value.status == 403 and "`allow_private_urls`" in refused.value.message, url
    for url in ["file:///etc/passwd", "ftp://example.com/x", "http:///nohost", "gopher://127.0.0.1/"]:
        with pytest.raises(ApiError):
            fetch_image_url(url, FetchPolicy(allow=True, allow_private=True))
    assert hits == []  # nothing was ever fetched
    assert fetch_image_url(f"{base}/cat.jpg", FetchPolicy(allow=True, allow_private=True))[:2] == b"\xff\xd8"
    with pytest.raises(ApiError) as big:
        fetch_image_url(f"{base}/big", FetchPolicy(allow=True, allow_private=True, max_bytes=1 << 20))
    assert "larger than" in big.value.message


def test_knn_service_image_url_through_the_app(tiny_index, image_host):  # noqa: F811
    base, _ = image_host
    body = json.dumps({"image_url": f"{base}/cat.jpg", "modality": "image", "num_images": 2})
    with make_client(("tiny", tiny_index), warm=False) as c:
        assert c.post("/knn-service", content=body).status_code == 403
    with make_client(("tiny", tiny_index), allow_image_urls=True, warm=False) as c:
        refused = c.post("/knn-service", content=body)
        assert refused.status_code == 403 and "non-public" in refused.json()["error"]
    with make_client(("tiny", tiny_index), allow_image_urls=True, allow_private_urls=True, warm=False) as c:
        results = c.post("/knn-service", content=body).json()
        assert len(results) == 2 and all("similarity" in r for r in results)
        junk = c.post("/knn-service", content=json.dumps({"image_url": f"{base}/big", "modality": "image"}))
        assert junk.status_code == 422


JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
KNN_KEYS = [
    "text",
    "image",
    "image_url",
    "embedding_input",
    "modality",
    "num_images",
    "num_result_ids",
    "indice_name",
    "deduplicate",
    "use_mclip",
    "use_safety_model",
    "aesthetic_score",
    "aesthetic_weight",
    "ids",
]
SEARCH_KEYS = ["index", "target", "k", "queries", "route", "nprobe", "ef_search", "exclude_self"]
QUERY = st.fixed_dictionaries(
    {},
    optional={
        "text": JSON | st.text(max_size=20),
        "image": JSON,
        "vector": JSON,
        "item": st.fixed_dictionaries(
            {}, optional={"kind": st.sampled_from(["image", "caption", "x"]) | JSON, "id": JSON}
        ),
    },
)


def bodies(keys: list[str]):
    values = {key: JSON for key in keys}
    values["queries"] = st.lists(QUERY, max_size=3) | JSON
    values["modality"] = st.sampled_from(["image", "text"]) | JSON
    values["ids"] = st.lists(JSON_LEAF, max_size=5) | JSON
    structured = st.fixed_dictionaries({}, optional={key: values[key] for key in keys}).map(json.dumps)
    return st.one_of(structured, JSON.map(json.dumps), st.text(max_size=60), st.binary(max_size=60))


@pytest.fixture(scope="module")
def fuzz_client(tiny_index):  # noqa: F811
    with make_client(("tiny", tiny_index), max_k=50) as c:
        yield c


@pytest.mark.parametrize(
    "path,keys", [("/knn-service", KNN_KEYS), ("/metadata", KNN_KEYS), ("/api/v1/search", SEARCH_KEYS)]
)
def test_fuzzed_bodies_never_get_a_5xx(fuzz_client, path, keys):
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies(keys))
    def check(body):
        response = fuzz_client.post(
            path, content=body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        )
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert isinstance(response.json()["error"], str)
        assert response.headers["access-control-allow-origin"] == "*"

    check()


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(segment=st.text(min_size=1, max_size=30))
def test_fuzzed_paths_never_get_a_5xx(fuzz_client, segment):
    from urllib.parse import quote

    for path in [
        f"/api/v1/thumbnails/{quote(segment, safe='')}",
        f"/api/v1/items/image/{quote(segment, safe='')}",
        f"/api/v1/items/{quote(segment, safe='')}/0",
        f"/api/v1/thumbnails/0?index={quote(segment, safe='')}&size=1",
    ]:
        response = fuzz_client.get(path)
        assert response.status_code < 500, (path, response.text)
