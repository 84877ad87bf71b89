"""Resumable builds: progress shards in ``<index>/.work/<key>/``, reused after a SIGKILL, never trusted blindly.

The kill tests run real ``python cli.py build-index`` processes with the tiny CLIP model and a
progress shard every 8 images (``RETRIEVAL_PROGRESS_SHARD_SIZE=8``). The killed runs go through a
two-line bootstrap that makes each image decode 20 ms slower, so that the kill reliably lands
in the middle of the embedding on any machine; the reruns are the plain command.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import COCO, require_shared_data

import retrieval
from retrieval import EmbedOptions, EncoderChoice
from retrieval.embed.pipeline import _batches, embed_images
from retrieval.embed.resume import (
    PROGRESS_SHARD_ENV,
    ProgressWriteError,
    WorkFolder,
    job_key,
)
from retrieval.sources.discovery import discover_images
from retrieval.sources.items import ImageRef
from retrieval.store.layout import MANIFEST_NAME, is_leftover_name
from retrieval.store.writer import StoreWriter, remove_stale_files

ROOT = Path(__file__).resolve().parents[1]
SHARD = 8

SLOW_BOOT = r"""
import runpy, sys, time
import retrieval.embed.pipeline as embed
_load = embed.load_image
embed.load_image = lambda *a, **k: (time.sleep(0.02), _load(*a, **k))[1]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The 80 COCO photos, copied so that one can be held out of the list."""
    require_shared_data()
    root = tmp_path_factory.mktemp("photos") / "images"
    shutil.copytree(COCO / "images", root)
    assert len(list(root.glob("*.jpg"))) == 80
    return root


def _cmd(index: Path, images: Path, tiny_clip_dir: Path) -> list[str]:
    return [
        str(ROOT / "cli.py"),
        "build-index",
        "--index",
        str(index),
        "--images",
        str(images),
        "--encoder",
        "open_clip:tiny",
        "--checkpoint",
        str(tiny_clip_dir),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--batch-size",
        "2",
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env[PROGRESS_SHARD_ENV] = str(SHARD)
    return env


def _run(cmd: list[str]) -> str:
    done = subprocess.run([sys.executable] + cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.npz"))


def _covered(folder: Path) -> int:
    spans = [re.match(r"shard-(\d+)-(\d+)\.npz", p.name).groups() for p in _shards(folder)]
    return sum(int(stop) - int(start) for start, stop in spans)


def _kill_after_shards(cmd: list[str], index: Path, tmp_path: Path, minimum: int = 2) -> tuple[Path, str]:
    """Run ``cmd`` slowed down, SIGKILL its process group once a new job folder holds ``minimum`` shards."""
    boot = tmp_path / "slow_boot.py"
    boot.write_text(SLOW_BOOT)
    work = index / ".work"
    before = set(work.iterdir()) if work.is_dir() else set()
    err = tmp_path / f"killed-{len(before)}.err"
    with open(err, "wb") as handle:
        child = subprocess.Popen(
            [sys.executable, str(boot)] + cmd,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=handle,
            start_new_session=True,
        )
    folder = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            new = set(work.iterdir()) - before if work.is_dir() else set()
            folder = next(iter(new), None)
            if folder is not None and len(_shards(folder)) >= minimum:
                break
            time.sleep(0.01)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, f"the build was not killed mid-way: {err.read_text()[-2000:]}"
    assert folder is not None and len(_shards(folder)) >= minimum
    return folder, err.read_text(errors="replace")


def _state(index: Path) -> dict:
    opened = retrieval.open_index(index, device="cpu")
    store, files = opened.store, opened.manifest["files"]["vectors"]
    return {
        "ids": list(opened.items("image")["id"]),
        "uris": list(opened.items("image")["uri"]),
        "sha256": list(opened.items("image")["sha256"]),
        "vectors": np.concatenate([store.read_array(rel) for rel in files["clip/image"]]),
        "errors": opened.errors(),
    }


def _assert_same_index(a: dict, b: dict) -> None:
    assert a["ids"] == b["ids"] and a["uris"] == b["uris"] and a["sha256"] == b["sha256"]
    assert a["vectors"].dtype == b["vectors"].dtype == np.float16
    assert np.array_equal(a["vectors"], b["vectors"]), "the float16 vectors differ"
    assert a["errors"] == b["errors"]


def _uninterrupted(index: Path, photos: Path, tiny_clip_dir: Path, options: EmbedOptions) -> Path:
    """One uninterrupted build in this process, with the command's options (it writes progress
    shards too, and removes them)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PROGRESS_SHARD_ENV, str(SHARD))
        retrieval.build_index(
            images=[photos],
            index=index,
            encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
            embed=options,
        )
    return index


def test_a_killed_build_resumes_and_equals_an_uninterrupted_one(tmp_path, photos, tiny_clip_dir):
    # the reference: one uninterrupted build, in this process with the options of the command
    # (it writes progress shards too, and removes them)
    reference = _uninterrupted(
        tmp_path / "reference", photos, tiny_clip_dir, EmbedOptions(batch_size=2, workers=0, progress=False)
    )
    assert not (reference / ".work").exists()
    expected = _state(reference)
    assert len(expected["ids"]) == 80

    index = tmp_path / "index"
    # (b) first a killed build over 79 photos (the first one held out): its work is stale for 80
    first = sorted(photos.glob("*.jpg"))[0]
    aside = tmp_path / first.name
    shutil.move(first, aside)
    try:
        stale, _ = _kill_after_shards(_cmd(index, photos, tiny_clip_dir), index, tmp_path)
    finally:
        shutil.move(aside, first)
    stale_shards = {p.name: p.read_bytes() for p in _shards(stale)}

    # the same command over 80 photos: another job key, nothing reused; killed too
    folder, killed_err = _kill_after_shards(_cmd(index, photos, tiny_clip_dir), index, tmp_path)
    assert folder.name != stale.name and "resuming" not in killed_err
    assert {p.name: p.read_bytes() for p in _shards(stale)} == stale_shards  # left alone, not mixed in
    assert not (index / MANIFEST_NAME).exists()
    covered = _covered(folder)
    assert covered >= 2 * SHARD and covered % SHARD == 0

    # (a) rerun the same command: it embeds only what the shards do not cover
    err = _run(_cmd(index, photos, tiny_clip_dir))
    assert f"resuming: {covered:,} of 80 images already embedded" in err, err[-2000:]
    built = retrieval.open_index(index, device="cpu")
    assert built.manifest["build"]["images_resumed"] == covered
    assert not any(".work" in rel for rel in built.manifest["checksums"])
    _assert_same_index(_state(index), expected)
    # (c) the work folder, stale job included, is gone after the commit
    assert not (index / ".work").exists()
    assert sorted(p.name for p in index.iterdir()) == ["errors.jsonl", "faiss", "items", "manifest.json", "vectors"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="encoder replicas are forked worker processes (Linux)")
def test_a_killed_build_with_encoder_replicas_resumes_exactly(tmp_path, photos, tiny_clip_dir):
    """The CPU default on Linux: two workers that decode and encode. SIGKILL takes the workers
    down with the build; the rerun equals an uninterrupted build with the same options."""
    options = EmbedOptions(batch_size=2, workers=2, replicas=True, progress=False)
    expected = _state(_uninterrupted(tmp_path / "reference", photos, tiny_clip_dir, options))
    index = tmp_path / "index"
    cmd = _cmd(index, photos, tiny_clip_dir)
    cmd[cmd.index("--workers") + 1] = "2"
    cmd.append("--replicas")
    folder, _ = _kill_after_shards(cmd, index, tmp_path)
    covered = _covered(folder)
    err = _run(cmd)
    assert f"resuming: {covered:,} of 80 images already embedded" in err, err[-2000:]
    _assert_same_index(_state(index), expected)
    build = retrieval.open_index(index, device="cpu").manifest["build"]
    assert (build["workers"], build["encoder_replicas"], build["images_resumed"]) == (2, True, covered)
    assert build["images_per_second"] > 0  # counts only the images this run embedded


class _Counting:
    """An image encoder that counts its batches and can be made to fail after a number of them."""

    def __init__(self, encoder, fail_after: int | None = None, numerics: str | None = None) -> None:
        self._encoder = encoder
        self.fail_after = fail_after
        self.batches = 0
        self.images = 0
        if numerics is not None:  # as an encoder that computes otherwise (int8 layers, bfloat16) reports
            self.numerics = numerics

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def encode_image_tensors(self, pixels):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt
        self.batches += 1
        self.images += len(pixels)
        return self._encoder.encode_image_tensors(pixels)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_clip_dir):
    from retrieval.encoders.registry import load_clip_encoder

    return load_clip_encoder("open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")


@pytest.fixture(scope="module")
def refs(photos, tmp_path_factory):
    """32 photos with a truncated JPEG at position 1 (a skipped image inside the first shard)."""
    found = discover_images([photos])[0][:31]
    broken = tmp_path_factory.mktemp("broken") / "broken.jpg"
    data = found[0].path.read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    return found[:1] + discover_images([broken])[0] + found[1:]


def _same_embedding(a, b) -> None:
    assert [(r.ref.id, r.width, r.height, r.sha256) for r in a.rows] == [
        (r.ref.id, r.width, r.height, r.sha256) for r in b.rows
    ]
    assert [(e.path, e.reason) for e in a.errors] == [(e.path, e.reason) for e in b.errors]
    assert a.vectors.dtype == b.vectors.dtype == np.float32 and np.array_equal(a.vectors, b.vectors)


def test_damaged_progress_shards_are_embedded_again(tmp_path, refs, tiny_encoder, capsys, caplog):
    options = EmbedOptions(batch_size=2, workers=0, progress=True, progress_shard_size=4)
    expected = embed_images(refs, tiny_encoder, EmbedOptions(batch_size=2, workers=0, progress=False))
    assert len(expected.rows) == 31 and len(expected.errors) == 1

    # a run interrupted after 8 batches (16 images): the shards already queued are still written
    interrupted = _Counting(tiny_encoder, fail_after=8)
    with pytest.raises(KeyboardInterrupt):
        embed_images(refs, interrupted, options, work_dir=tmp_path)
    (folder,) = (tmp_path / ".work").iterdir()
    shards = _shards(folder)
    assert [p.name for p in shards] == [f"shard-{a:010d}-{a + 4:010d}.npz" for a in (0, 4, 8, 12)]

    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated
    data = bytearray(shards[2].read_bytes())
    at = data.index(b"vectors.npy") + 400  # inside the vectors member: the zip and our checksum disagree
    data[at] ^= 0xFF
    shards[2].write_bytes(bytes(data))
    (folder / ".shard-0000000016-0000000020.npz.x1.tmp").write_bytes(b"half written")
    (folder / "shard-0000000016-0000000040.npz").write_bytes(b"\0" * 100)  # beyond the list: refused

    capsys.readouterr()
    rerun = _Counting(tiny_encoder)
    with caplog.at_level(logging.WARNING, logger="retrieval.embed.resume"):
        resumed = embed_images(refs, rerun, options, work_dir=tmp_path)
    assert "resuming: 8 of 32 images already embedded" in capsys.readouterr().err
    assert resumed.resumed == 8
    assert rerun.images == 32 - 8 and rerun.batches == (32 - 8) // 2  # the damaged shards' images, and the rest
    damaged = [r.getMessage() for r in caplog.records if "ignoring damaged progress shard" in r.getMessage()]
    assert len(damaged) == 3, damaged
    _same_embedding(resumed, expected)
    # the damaged shards were replaced by good ones covering the same positions
    names = [p.name for p in _shards(folder)]
    assert names[:4] == [f"shard-{a:010d}-{a + 4:010d}.npz" for a in (0, 4, 8, 12)]
    assert not list(folder.glob("*.tmp"))

    # every position is now in a complete shard: a third run embeds nothing
    third = _Counting(tiny_encoder)
    again = embed_images(refs, third, options, work_dir=tmp_path)
    assert again.resumed == 32 and third.images == 0
    _same_embedding(again, expected)


def test_the_job_key_follows_the_inputs(tmp_path, refs, tiny_encoder):
    transform = tiny_encoder.image_transform()
    paths = [ref.path for ref in refs]
    key = job_key(paths, tiny_encoder, 2, transform)
    assert key == job_key(list(paths), tiny_encoder, 2, tiny_encoder.image_transform())
    assert key != job_key(paths[1:], tiny_encoder, 2, transform)  # an image less
    assert key != job_key(paths[::-1], tiny_encoder, 2, transform)  # another order
    assert key != job_key(paths, tiny_encoder, 4, transform)  # other batches

    class Resize:  # the default repr carries no settings (and a memory address): its attributes count
        def __init__(self, size: int) -> None:
            self.size = size

    assert job_key(paths, tiny_encoder, 2, Resize(32)) == job_key(paths, tiny_encoder, 2, Resize(32))
    assert job_key(paths, tiny_encoder, 2, Resize(32)) != job_key(paths, tiny_encoder, 2, Resize(64))
    assert key != job_key(paths, tiny_encoder, 2, transform, draft_size=(32, 32))  # decoded otherwise
    # settings that change the arithmetic, hence the last bits of the vectors
    assert key != job_key(paths, tiny_encoder, 2, transform, replicas=True)
    assert key != job_key(paths, tiny_encoder, 2, transform, compile=True)
    assert key != job_key(paths, _Counting(tiny_encoder, numerics="bf16-autocast"), 2, transform)
    assert job_key(paths, _Counting(tiny_encoder, numerics="fp32"), 2, transform) != job_key(
        paths, _Counting(tiny_encoder, numerics="int8-linear"), 2, transform
    )
    # file items: the same key whether given as paths or as ImageRefs
    assert key == job_key(refs, tiny_encoder, 2, transform)
    copy = tmp_path / "copy.jpg"
    shutil.copy(paths[0], copy)
    before = job_key([copy] + paths[1:], tiny_encoder, 2, transform)
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert before != job_key([copy] + paths[1:], tiny_encoder, 2, transform)  # a file changed


@pytest.mark.parametrize("setting", ["numerics", "replicas"])
def test_a_resume_with_other_vector_settings_starts_over(tmp_path, refs, tiny_encoder, setting):
    """Shards embedded with other arithmetic are not mixed in; the same settings reuse them."""
    if setting == "replicas" and not sys.platform.startswith("linux"):
        pytest.skip("encoder replicas are forked worker processes (Linux)")
    base = {"batch_size": 2, "progress": False, "progress_shard_size": 4}
    if setting == "numerics":
        first = (lambda: _Counting(tiny_encoder, numerics="fp32"), EmbedOptions(workers=0, **base))
        other = (lambda: _Counting(tiny_encoder, numerics="int8-linear"), EmbedOptions(workers=0, **base))
    else:
        first = (lambda: _Counting(tiny_encoder), EmbedOptions(workers=2, replicas=False, **base))
        other = (lambda: _Counting(tiny_encoder), EmbedOptions(workers=2, replicas=True, **base))
    done = embed_images(refs[:12], first[0](), first[1], work_dir=tmp_path)
    assert done.resumed == 0 and len(_shards(next((tmp_path / ".work").iterdir()))) == 3
    assert embed_images(refs[:12], other[0](), other[1], work_dir=tmp_path).resumed == 0  # started over
    again = embed_images(refs[:12], first[0](), first[1], work_dir=tmp_path)
    assert again.resumed == 12  # the same settings: every shard reused
    _same_embedding(again, done)
    # and the other job's shards serve the other settings (nothing left to embed: no workers start)
    assert embed_images(refs[:12], other[0](), other[1], work_dir=tmp_path).resumed == 12


def test_in_memory_items_resume_without_opening_or_stating_anything(tmp_path, photos, tiny_encoder):
    """Items whose bytes come from a dict (no file paths), one undecodable; the resume key uses
    each item's uri and declared version, so a complete rerun opens nothing."""
    blobs = {f"mem://photos/{p.name}": p.read_bytes() for p in sorted(photos.glob("*.jpg"))[:11]}
    blobs = dict(
        list(blobs.items())[:2] + [("mem://photos/garbage.jpg", b"GIF89a but no picture")] + list(blobs.items())[2:]
    )
    opened: list[str] = []

    def opener(uri: str):
        opened.append(uri)
        return io.BytesIO(blobs[uri])  # a file object: read and closed by the pipeline

    def items(version_of=lambda uri: len(blobs[uri])):
        return [
            ImageRef(uri=uri, opener=functools.partial(opener, uri), source="memory", version=version_of(uri))
            for uri in blobs
        ]

    expected = embed_images(items(), tiny_encoder, EmbedOptions(batch_size=2, workers=0, progress=False))
    assert len(expected.rows) == 11 and [e.path for e in expected.errors] == ["mem://photos/garbage.jpg"]
    assert (
        "not an image" in expected.errors[0].reason
        and expected.rows[0].ref.location == "mem://photos/" + sorted(photos.glob("*.jpg"))[0].name
    )

    options = EmbedOptions(batch_size=2, workers=0, progress=False, progress_shard_size=4)
    with pytest.raises(KeyboardInterrupt):
        embed_images(items(), _Counting(tiny_encoder, fail_after=4), options, work_dir=tmp_path)
    rerun = _Counting(tiny_encoder)
    resumed = embed_images(items(), rerun, options, work_dir=tmp_path)
    assert resumed.resumed == 8 and rerun.images == 4
    _same_embedding(resumed, expected)

    opened.clear()
    again = embed_images(items(), _Counting(tiny_encoder), options, work_dir=tmp_path)
    assert again.resumed == 12 and opened == []  # nothing opened to compute the key or to resume
    _same_embedding(again, expected)
    changed = embed_images(items(lambda uri: "etag-2"), _Counting(tiny_encoder), options, work_dir=tmp_path)
    assert changed.resumed == 0  # other versions of the items: other work


def test_a_failing_shard_writer_stops_the_build(tmp_path, refs, tiny_encoder, monkeypatch):
    def full(self, shard):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(WorkFolder, "_write", full)
    options = EmbedOptions(batch_size=2, workers=0, progress=False, progress_shard_size=4)
    with pytest.raises(ProgressWriteError, match="No space left on device"):
        embed_images(refs[:12], tiny_encoder, options, work_dir=tmp_path)


def test_batches_restart_at_shard_boundaries():
    todo = np.array([0, 1, 2, 3, 4, 8, 9, 10, 11, 16, 17, 18])
    assert _batches(todo, 4) == [[0, 1, 2, 3], [4], [8, 9, 10, 11], [16, 17, 18]]
    assert _batches(np.array([], np.int64), 4) == []


def test_the_work_folder_survives_store_cleanup_and_goes_after_a_build(tmp_path, photos, tiny_clip_dir, monkeypatch):
    index = tmp_path / "index"
    junk = index / ".work" / "0123abcd" / "shard-0000000000-0000000004.npz"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"from a killed first build")
    assert is_leftover_name(".work")
    writer = StoreWriter(index, kind="index")
    writer.commit({"files": {}})
    assert junk.exists() and not remove_stale_files(index, keep=set(writer.files)) and junk.exists()
    (index / MANIFEST_NAME).unlink()  # as if the build that left .work behind never committed

    monkeypatch.setenv(PROGRESS_SHARD_ENV, "2")
    images = sorted(photos.glob("*.jpg"))[:5]
    built = retrieval.build_index(
        images=images,
        index=index,
        encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
        embed=EmbedOptions(batch_size=2, workers=0, progress=False),
    )
    assert built.manifest["counts"]["image"] == 5 and built.manifest["build"]["images_resumed"] == 0
    assert not (index / ".work").exists()


def test_bad_progress_shard_size_is_an_input_error(monkeypatch):
    with pytest.raises(retrieval.InputError):
        EmbedOptions(progress_shard_size=-1)
    monkeypatch.setenv(PROGRESS_SHARD_ENV, "many")
    with pytest.raises(retrieval.InputError, match=PROGRESS_SHARD_ENV):
        EmbedOptions().resolved_progress_shard_size()
    monkeypatch.setenv(PROGRESS_SHARD_ENV, "0")
    assert EmbedOptions().resolved_progress_shard_size() == 0
    assert EmbedOptions(progress_shard_size=16).resolved_progress_shard_size() == 16
