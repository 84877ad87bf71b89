"""Bad input at build level: odd images are indexed, broken ones skipped and reported, nothing old is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import COCO, coco_pairs, require_shared_data
from PIL import Image

import retrieval
from retrieval import EmbedOptions, EncoderChoice
from retrieval.embed.workers import PAUSE_ENV

ROOT = Path(__file__).resolve().parents[1]
QUIET = EmbedOptions(batch_size=4, workers=0, progress=False)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> Path:
    """Real photo re-encoded in awkward modes, plus files that cannot be decoded."""
    require_shared_data()
    root = tmp_path_factory.mktemp("odd")
    photo = Image.open(COCO / coco_pairs(1)[0]["image"]).convert("RGB")
    photo.save(root / "plain.jpg")
    photo.convert("CMYK").save(root / "cmyk.jpg")
    photo.convert("RGBA").save(root / "alpha.png")
    photo.convert("P").save(root / "palette.png")
    grey16 = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey16).save(root / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, to be shown rotated
    photo.transpose(Image.Transpose.ROTATE_90).save(root / "rotated.jpg", exif=exif)
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not an image")
    data = (root / "plain.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return root


def test_odd_images_are_indexed_and_broken_ones_reported(tmp_path, odd_folder, tiny_clip_dir):
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"caption": "a person"}\n{"caption": broken json\n{"caption": "a table"}\n', encoding="utf-8")
    index = retrieval.build_index(
        images=[odd_folder],
        captions=[captions],
        index=tmp_path / "i",
        encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
        embed=QUIET,
    )
    indexed = sorted(Path(uri).name for uri in index.items("image")["uri"])
    assert indexed == ["alpha.png", "cmyk.jpg", "grey16.png", "palette.png", "plain.jpg", "rotated.jpg"]
    errors = {Path(row["path"]).name: row for row in index.errors()}
    assert set(errors) == {"empty.jpg", "notes.jpg", "truncated.jpg", "captions.jsonl"}
    assert errors["captions.jsonl"]["row"] == 2 and errors["captions.jsonl"]["kind"] == "caption"
    assert index.manifest["counts"] == {"image": 6, "caption": 2}
    # the EXIF-rotated copy embeds like the upright photo
    vectors = index.store.read_vectors(index.manifest["files"]["vectors"]["clip/image"])
    images = index.items("image")
    names = [Path(uri).name for uri in images["uri"]]
    plain, rotated = vectors[names.index("plain.jpg")], vectors[names.index("rotated.jpg")]
    assert float(plain @ rotated) > 0.99
    sizes = dict(zip(names, zip(images["width"], images["height"], strict=True), strict=True))
    assert sizes["rotated.jpg"] == sizes["plain.jpg"]


def test_a_caption_row_in_another_encoding_is_skipped_not_fatal(tmp_path, odd_folder, tiny_clip_dir):
    """A UTF-8 CSV (BOM, CRLF) with one Latin-1 row builds; the row is in errors.jsonl with line and byte."""
    captions = tmp_path / "captions.csv"
    good = b"caption\r\na person at a table\r\na plate of food\r\n"
    captions.write_bytes(b"\xef\xbb\xbf" + good + "un caf\xe9 noir\r\n".encode("latin-1") + b"a cup of tea\r\n")
    index = retrieval.build_index(
        images=[odd_folder / "plain.jpg"],
        captions=[captions],
        index=tmp_path / "i",
        encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
        embed=QUIET,
    )
    assert index.items("caption")["caption"] == ["a person at a table", "a plate of food", "a cup of tea"]
    [error] = [row for row in index.errors() if row["kind"] == "caption"]
    offset = captions.read_bytes().index(b"\xe9")
    assert (error["row"], error["line"], error["byte"]) == (3, 4, offset)
    assert f"cannot decode as utf-8 at byte {offset}" in error["reason"]
    on_disk = [json.loads(line) for line in (tmp_path / "i" / "errors.jsonl").read_text().splitlines()]
    assert error in on_disk


def test_empty_folder_and_missing_path_are_one_line_errors(tmp_path, tiny_clip_dir):
    (tmp_path / "empty").mkdir()
    choice = EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir))
    with pytest.raises(retrieval.InputError, match="empty"):
        retrieval.build_index(images=[tmp_path / "empty"], index=tmp_path / "i", encoders=choice, embed=QUIET)
    with pytest.raises(retrieval.InputError, match="no such file"):
        retrieval.build_index(images=[tmp_path / "missing"], index=tmp_path / "i", encoders=choice, embed=QUIET)
    assert not (tmp_path / "i").exists()


def test_sigkill_during_a_rebuild_leaves_the_previous_index_intact(tmp_path, tiny_clip_dir, small_collection):
    """Kill a real build process at several points; the old index must open and answer identically."""
    require_shared_data()
    index = tmp_path / "index"
    base = [
        sys.executable,
        str(ROOT / "cli.py"),
        "build-index",
        "--index",
        str(index),
        "--encoder",
        "open_clip:tiny",
        "--checkpoint",
        str(tiny_clip_dir),
        "--device",
        "cpu",
        "--quiet",
        "--workers",
        "0",
        "--batch-size",
        "2",
    ]
    subprocess.run(
        base + ["--captions", str(small_collection / "pairs.jsonl")], check=True, capture_output=True, timeout=300
    )
    before = [h.id for h in retrieval.open_index(index).text_to_image("a plate of food", k=5)]
    bigger = base + ["--images", str(COCO / "images"), "--captions", str(COCO / "captions.jsonl")]
    for batches in (
        1,
        40,
    ):  # of its 40 image batches (the first, the last): stopped there by the test hook, then killed
        env = dict(os.environ) | {PAUSE_ENV: str(batches)}
        process = subprocess.Popen(
            bigger, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
        )
        _, status = os.waitpid(process.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"the build ended before its batch {batches}"
        os.killpg(process.pid, signal.SIGKILL)
        os.killpg(process.pid, signal.SIGCONT)
        os.waitpid(process.pid, 0)
        process.returncode = -signal.SIGKILL
        reopened = retrieval.open_index(index)
        assert reopened.manifest["counts"] == {"image": 6, "caption": 30}
        assert [h.id for h in reopened.text_to_image("a plate of food", k=5)] == before
    # and rerunning the command completes the build
    subprocess.run(bigger, check=True, capture_output=True, timeout=600)
    final = retrieval.open_index(index)
    assert final.manifest["counts"] == {"image": 80, "caption": 400}
    leftovers = [p for p in index.rglob("*") if p.is_file() and final.manifest["build_id"] not in p.name]
    assert sorted(p.name for p in leftovers) == ["errors.jsonl", "manifest.json"]
    json.loads((index / "manifest.json").read_text())
