"""Shared pieces of the browser tests: Debian's Chromium driven by Playwright, our app served by
uvicorn on a thread, a folder served as static files, and a small ASIF index of COCO photos.

Without a browser (or Playwright, or clip-retrieval's front end) a test skips with the reason, except
under CI (``CI`` set, as ``.ci/run`` does), where it fails: CI must run the browser tests.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import COCO, TEST_DEVICE, coco_pairs, require_shared_data, under_ci


def need(reason: str) -> None:
    """Skip the calling test for want of ``reason``; under CI fail it instead."""
    if under_ci():
        pytest.fail(f"{reason}: CI must run the browser tests (the CI environment variable is set)")
    pytest.skip(reason)


def chromium_path() -> str:
    """The Chromium executable on PATH (Debian's ``chromium`` package); skips or fails without one."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        need("no chromium on PATH (apt-get install -y --no-install-recommends chromium)")
    return found


def clip_front_dir() -> Path:
    """clip-front's built page, shipped by the clip-retrieval 2.45.0 wheel as top-level ``front/build``."""
    for entry in sys.path:
        folder = Path(entry or ".") / "front" / "build"
        if (folder / "index.html").is_file() and (folder / "config.json").is_file():
            return folder
    need(
        "clip-front not found: front/build from the clip-retrieval==2.45.0 wheel "
        "(pip install --no-deps clip-retrieval==2.45.0)"
    )
    raise AssertionError("unreachable")


@contextmanager
def chromium() -> Iterator:
    """A headless Chromium launched by Playwright from the system's executable."""
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need("playwright is not installed (pip install playwright)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve_app(app) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a thread on a free 127.0.0.1 port; yields its base URL."""
    import uvicorn

    sock = _loopback_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # the stdlib's signature
        pass


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` as static files on a free 127.0.0.1 port; yields its base URL."""
    handler = functools.partial(_QuietFiles, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def coco_index(base: Path, n_images: int) -> Path:
    """An ASIF index (EfficientNet-Lite0 + MiniLM, ``builtin:imagenet`` anchors) of the first ``n_images``
    COCO photos and their captions, built once per test session under ``base`` (a session temp folder).

    The pairs file holds only image and caption, so no result carries a URL a browser would try to fetch.
    """
    import retrieval
    from retrieval import EmbedOptions, EncoderChoice

    require_shared_data()
    root = base / f"browser-coco-{n_images}"
    if (root / "index" / "manifest.json").is_file():
        return root / "index"
    rows = coco_pairs(n_images)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for image in {row["image"] for row in rows}:
        shutil.copy(COCO / image, root / image)
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"image": row["image"], "caption": row["caption"]}) + "\n")
    retrieval.build_index(
        images=[root / "images"],
        captions=[root / "pairs.jsonl"],
        index=root / "index",
        encoders=EncoderChoice(image="efficientnet-lite0", text="minilm", device=TEST_DEVICE),
        anchors="builtin:imagenet",
        embed=EmbedOptions(batch_size=16, workers=0, progress=False),
    )
    return root / "index"


def post_json(url: str, body: dict, headers: dict | None = None) -> object:
    """POST ``body`` as JSON and return the decoded answer (raises on an HTTP error)."""
    import urllib.request

    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())
