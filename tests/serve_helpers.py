"""Shared pieces of the serve tests: a tiny CLIP index over 6 COCO photos, an app over it, a real server process."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

import retrieval
from retrieval import EmbedOptions, EncoderChoice

QUIET = EmbedOptions(batch_size=8, workers=0, progress=False)
REPO = Path(__file__).resolve().parents[1]


def build_tiny_index(path: Path, tiny_clip_dir: Path, collection: Path, images: bool = True) -> Path:
    retrieval.build_index(
        images=[collection / "images"] if images else [],
        captions=[collection / "pairs.jsonl", collection / "captions.txt"],
        index=path,
        encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
        embed=QUIET,
    )
    return path


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory, tiny_clip_dir, small_collection) -> Path:
    return build_tiny_index(tmp_path_factory.mktemp("serve") / "tiny", tiny_clip_dir, small_collection)


def make_client(*indexes: tuple[str, Path], **settings):
    from fastapi.testclient import TestClient

    from retrieval.serve.app import create_app
    from retrieval.serve.config import ServeConfig

    settings.setdefault("device", "cpu")
    return TestClient(create_app(ServeConfig(list(indexes), **settings)), raise_server_exceptions=False)


def b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_process(*args: str, wait_s: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """``retrieval serve ARGS --port P`` as a subprocess; yields (base URL, process) once /healthz answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    command = [
        sys.executable,
        "-c",
        "from retrieval.cli import main; main()",
        "serve",
        *args,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    # a file, not a pipe: a long log never blocks the server
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        process.read_log = lambda: (log.seek(0), log.read())[1]  # type: ignore[attr-defined]
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + wait_s
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"serve exited with {process.returncode}: {process.read_log()}")
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"serve did not answer /healthz within {wait_s} s")
                time.sleep(0.2)
            yield url, process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
