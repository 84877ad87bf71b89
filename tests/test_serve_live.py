"""The server live: a new build switched in while requests run; a real `retrieval serve` process over COCO photos
(ASIF, offline encoders) queried by clip-retrieval's own ClipClient, then stopped with SIGTERM."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import COCO, coco_pairs, require_shared_data, under_ci
from serve_helpers import (  # noqa: F401
    QUIET,
    build_tiny_index,
    make_client,
    serve_process,
    tiny_index,
)

import retrieval
from retrieval import EncoderChoice

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_hot_switch_serves_the_new_build_and_no_request_fails(tmp_path, tiny_clip_dir, small_collection):
    path = build_tiny_index(tmp_path / "live", tiny_clip_dir, small_collection)
    extra = tmp_path / "more.txt"
    extra.write_text("a violet giraffe reading a newspaper\n", encoding="utf-8")
    failures, answered, stop = [], [], threading.Event()
    with make_client(("live", path), poll_s=0.05) as client:
        old_build = client.get("/healthz").json()["indexes"]["live"]

        def hammer() -> None:
            while not stop.is_set():
                response = client.post(
                    "/api/v1/search", json={"queries": [{"text": "a plate of food"}], "k": 3, "target": "caption"}
                )
                (answered if response.status_code == 200 else failures).append(
                    (response.status_code, response.text[:200])
                )

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            retrieval.add_to_index(path, captions=[extra], embed=QUIET, device="cpu")
            deadline = time.monotonic() + 60
            while client.get("/healthz").json()["indexes"]["live"] == old_build:
                assert time.monotonic() < deadline, "the server did not switch to the new build within 60 s"
                time.sleep(0.05)
            time.sleep(0.3)  # keep the load on across the switch
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert failures == [] and len(answered) > 4
        body = client.post(
            "/api/v1/search",
            json={"queries": [{"text": "a violet giraffe reading a newspaper"}], "target": "caption", "k": 1},
        ).json()
        assert body["build"] != old_build
        assert body["results"][0]["hits"][0]["caption"] == "a violet giraffe reading a newspaper"
        assert client.get("/metrics").text.count('retrieval_index_switches{index="live"} 1.0') == 1


def test_a_damaged_new_build_keeps_the_old_one_served(tmp_path, tiny_clip_dir, small_collection):
    path = build_tiny_index(tmp_path / "kept", tiny_clip_dir, small_collection)
    with make_client(("kept", path), poll_s=0.05, warm=False) as client:
        build = client.get("/healthz").json()["indexes"]["kept"]
        manifest = path / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"format": 1', '"format": 99'))
        for _ in range(20):
            assert client.post("/api/v1/search", json={"queries": [{"text": "food"}], "k": 1}).status_code == 200
            time.sleep(0.05)
        assert client.get("/healthz").json()["indexes"]["kept"] == build


def clip_client_module():
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        message = "clip-retrieval is not installed (make setup installs it with --no-deps)"
        pytest.fail(message) if under_ci() else pytest.skip(message)
    path = Path(list(spec.submodule_search_locations)[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_client_by_path", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # the package __init__ (torch, flask, wandb...) is never run
    return module


@pytest.fixture(scope="module")
def coco_index(tmp_path_factory) -> Path:
    """24 COCO photos and their 120 captions, EfficientNet-Lite0 + MiniLM through the built-in ImageNet anchors."""
    require_shared_data()
    root = tmp_path_factory.mktemp("coco-serve")
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as handle:
        for row in coco_pairs(24):
            handle.write(json.dumps({"image": str(COCO / row["image"]), "caption": row["caption"]}) + "\n")
    retrieval.build_index(
        captions=[root / "pairs.jsonl"],
        index=root / "coco",
        anchors="builtin:imagenet",
        embed=QUIET,
        encoders=EncoderChoice(image="efficientnet-lite0", text="minilm", device="cpu"),
    )
    return root / "coco"


def test_clip_client_over_coco_then_sigterm(coco_index, tmp_path):
    clip_client = clip_client_module()
    index = retrieval.open_index(coco_index, device="cpu")
    images, captions = index.items("image"), index.items("caption")
    with serve_process("--index", f"coco={coco_index}") as (url, process):
        client = clip_client.ClipClient(url=f"{url}/knn-service", indice_name="coco", num_images=5)
        ranks = []
        for row in range(0, 120, 12):  # a photo's own caption finds the photo among the first few
            hits = client.query(text=captions["caption"][row])
            paths = [hit["image_path"] for hit in hits]
            ranks.append(paths.index(captions["image_uri"][row]) if captions["image_uri"][row] in paths else 99)
            assert all(set(hit) >= {"id", "similarity", "image_path", "caption", "image"} for hit in hits)
        assert sum(rank < 5 for rank in ranks) >= 7, ranks
        photo = Path(images["uri"][7])
        local = tmp_path / "query.jpg"
        shutil.copy(photo, local)
        assert client.query(image=str(local))[0]["image_path"] == str(photo)  # image -> image: itself first
        stored = index.vector_source(f"{index.manifest['spaces']['image']}/image").take(np.array([11]))[0]
        assert client.query(embedding_input=stored.tolist())[0]["id"] == 11
        text_client = clip_client.ClipClient(
            url=f"{url}/knn-service", indice_name="coco", num_images=5, modality=clip_client.Modality.TEXT
        )
        found = text_client.query(image=str(local))
        assert any(hit["image_path"] == str(photo) for hit in found), found  # its own captions among the first five
        assert httpx.post(f"{url}/metadata", json={"ids": [found[0]["id"]], "indice_name": "coco"}).json()[0][
            "metadata"
        ]["caption"]
        process.send_signal(__import__("signal").SIGTERM)
        assert process.wait(timeout=30) == 0
        log = process.read_log()
    assert "POST /knn-service 200" in log and "listening on http://127.0.0.1:" in log and "stopped" in log


def test_sigint_stops_a_server_cleanly(tmp_path, tiny_clip_dir, small_collection):
    import signal

    path = build_tiny_index(tmp_path / "stop", tiny_clip_dir, small_collection)
    with serve_process("--index", str(path)) as (url, process):
        assert httpx.get(f"{url}/api/v1/indexes", timeout=10).json()["default"] == "stop"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        log = process.read_log()
    assert "GET /api/v1/indexes 200" in log and "stopped (SIGINT)" in log and "Traceback" not in log


def test_the_command_warns_on_a_public_address_without_a_key(tiny_index, monkeypatch):  # noqa: F811
    from click.testing import CliRunner

    from retrieval.cli import serve as serve_cli
    from retrieval.cli.main import main

    started = []
    monkeypatch.setattr(
        serve_cli, "run_until_signal", lambda app, host, port: started.append((host, port)) or "SIGTERM"
    )
    public = CliRunner().invoke(main, ["serve", "--index", f"t={tiny_index}", "--host", "0.0.0.0", "--device", "cpu"])
    assert public.exit_code == 0, public.output
    assert "without --api-key" in public.stderr and started == [("0.0.0.0", 1234)]
    keyed = CliRunner().invoke(
        main, ["serve", "--index", f"t={tiny_index}", "--host", "0.0.0.0", "--api-key", "k", "--device", "cpu"]
    )
    local = CliRunner().invoke(main, ["serve", "--index", str(tiny_index), "--device", "cpu"])
    assert "without --api-key" not in keyed.stderr + local.stderr and keyed.exit_code == local.exit_code == 0
    missing = CliRunner().invoke(main, ["serve", "--index", str(tiny_index.parent / "nothing-here")])
    assert missing.exit_code != 0 and "nothing-here" in missing.output
    assert serve_cli.is_loopback("127.0.0.1") and serve_cli.is_loopback("::1") and serve_cli.is_loopback("localhost")
    assert not serve_cli.is_loopback("0.0.0.0") and not serve_cli.is_loopback("192.168.1.4")
