"""img2dataset itself, run as users run it, offline: ``python -m http.server --bind 127.0.0.1`` serves
the COCO photos, img2dataset downloads them from a ``url,caption`` csv into ``webdataset`` shards, ``parquet``
and its ``files`` layout, and each output indexes to the same photos as the loose files (mapped through the json url).

img2dataset (wandb, opencv, albumentations, pandas, its own webdataset pin) lives in its own venv,
``.venv-tools``, made by ``make setup``: a producer run as a command, kept out of the project's
dependencies. ``RETRIEVAL_IMG2DATASET`` may name another executable. Under CI the test fails without it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import COCO, require_shared_data, under_ci
from test_sources_shards import QUERIES, _choice, coco_samples

import retrieval
from retrieval import EmbedOptions

ROOT = Path(__file__).resolve().parents[1]
N_PHOTOS = 12
# img2dataset's threads write the photos in any order; one image per batch makes each vector independent of
# its batch neighbours (the CPU encoder quantises activations per batch), so the scores match exactly
QUIET = EmbedOptions(batch_size=1, workers=0, progress=False)


def img2dataset_command() -> str:
    """The img2dataset executable: $RETRIEVAL_IMG2DATASET, .venv-tools/bin/img2dataset, or one on PATH."""
    for candidate in (
        os.environ.get("RETRIEVAL_IMG2DATASET"),
        str(ROOT / ".venv-tools" / "bin" / "img2dataset"),
        shutil.which("img2dataset"),
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    message = "img2dataset not installed: `make setup` puts it in .venv-tools (or set RETRIEVAL_IMG2DATASET)"
    if under_ci():
        pytest.fail(message + "; under CI this test must run")
    pytest.skip(message)


@pytest.fixture(scope="module")
def photo_server():
    """A local HTTP server over the COCO photos; yields its base url."""
    require_shared_data()
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(COCO / "images")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = server.stdout.readline()
        port = re.search(r"port (\d+)", line)
        assert port, f"http.server did not start: {line!r}"
        yield f"http://127.0.0.1:{port.group(1)}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_img2dataset(tmp: Path, base_url: str, output_format: str) -> Path:
    samples = coco_samples(N_PHOTOS)
    urls = tmp / "urls.csv"
    with open(urls, "w", encoding="utf-8") as handle:
        handle.write("url,caption\n")
        for sample in samples:
            handle.write(f'{base_url}/{sample["file"].name},"{sample["caption"].replace(chr(34), "")}"\n')
    out = tmp / f"out-{output_format}"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [
            img2dataset_command(),
            "--url_list",
            str(urls),
            "--input_format",
            "csv",
            "--url_col",
            "url",
            "--caption_col",
            "caption",
            "--output_format",
            output_format,
            "--output_folder",
            str(out),
            "--processes_count",
            "1",
            "--thread_count",
            "4",
            "--resize_mode",
            "no",
            "--skip_reencode",
            "True",
            "--enable_wandb",
            "False",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "success: 1.000" in done.stdout + done.stderr, (done.stdout + done.stderr)[-2000:]
    return out


@pytest.mark.slow
def test_img2dataset_shards_parquet_and_files_index_to_the_same_photos_as_loose_files(
    tmp_path, tiny_clip_dir, photo_server
):
    img2dataset_command()
    loose = tmp_path / "loose"
    loose.mkdir()
    for sample in coco_samples(N_PHOTOS):
        shutil.copy(sample["file"], loose / sample["file"].name)
    reference = retrieval.build_index(
        images=[loose], index=tmp_path / "files", encoders=_choice(tiny_clip_dir), embed=QUIET
    )
    expected = [[(Path(h.uri).name, round(h.score, 5)) for h in reference.text_to_image(q, k=6)] for q in QUERIES]
    for output_format in ("webdataset", "parquet", "files"):
        out = run_img2dataset(tmp_path, photo_server, output_format)
        index = retrieval.build_index(
            images=[out], index=tmp_path / output_format, encoders=_choice(tiny_clip_dir), embed=QUIET
        )
        assert index.info()["counts"] == {"image": N_PHOTOS, "caption": N_PHOTOS}, output_format
        assert not index.errors(), output_format
        got = read_urls(index, out)
        found = [
            [(got[h.uri].rsplit("/", 1)[1], round(h.score, 5)) for h in index.text_to_image(q, k=6)] for q in QUERIES
        ]
        assert found == expected, output_format


def read_urls(index, out: Path) -> dict[str, str]:
    """uri -> the url img2dataset recorded for it (its json / metadata columns), read from the outputs themselves."""
    from retrieval.sources.inputs import read_image_sources

    return {ref.location: ref.metadata["url"] for ref in read_image_sources([out]).images}
