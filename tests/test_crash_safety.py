"""Crash safety: real ``python cli.py build-index`` processes killed with SIGKILL, at every step of the commit.

Two kinds of kill points:

* deterministic ones: the child runs cli.py under a tiny bootstrap that stops it (SIGSTOP) just
  before and just after every rename and unlink it makes inside the index. Whatever is on disk
  while it is stopped is exactly what a SIGKILL at that instant leaves behind, so the test checks
  the index at every such point (each write, the errors.jsonl and manifest renames, each deletion of
  the old build's files, the lock release), then lets it go on; at one seeded point it really kills it.
* mid-embedding ones: a plain ``python cli.py build-index`` that stops itself after a seeded number
  of image batches (the ``RETRIEVAL_TEST_PAUSE_AFTER_BATCHES`` test hook), then is killed: never a
  guessed delay, which a fast build can outrun.

After every kill the index must be exactly the previous build (same build id, same answers) or
exactly the new one; after a rerun completes, nothing else is left in the directory.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import hostile
import numpy as np
import pytest
from conftest import COCO, coco_pairs, require_shared_data

import retrieval
import retrieval.sources.images
from retrieval import EmbedOptions, EncoderChoice
from retrieval.embed.workers import PAUSE_ENV
from retrieval.store.layout import ERRORS_NAME, MANIFEST_NAME
from retrieval.store.locking import writer_lock

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["a plate of food", "a man riding a horse", "people at a table"]

BOOTSTRAP = r"""
import os, signal, sys, runpy
root = os.path.realpath(os.environ["CRASHPOINT_DIR"])
log = os.environ["CRASHPOINT_LOG"]
real_replace, real_unlink = os.replace, os.unlink

def inside(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(root + os.sep)
    except Exception:
        return False

def stop(point, path):
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(point + " " + os.path.relpath(os.fsdecode(path), root) + "\n")
    os.kill(os.getpid(), signal.SIGSTOP)

def replace(src, dst, *args, **kwargs):
    if not inside(dst):
        return real_replace(src, dst, *args, **kwargs)
    stop("before-replace", dst)
    result = real_replace(src, dst, *args, **kwargs)
    stop("after-replace", dst)
    return result

def unlink(path, *args, **kwargs):
    if not (inside(path) and os.path.lexists(path)):
        return real_unlink(path, *args, **kwargs)
    stop("before-unlink", path)
    result = real_unlink(path, *args, **kwargs)
    stop("after-unlink", path)
    return result

os.replace, os.unlink, os.remove = replace, unlink, unlink
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _cli(index: Path, tiny_clip_dir: Path, images: Path | None, captions: Path) -> list[str]:
    args = [
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
        "--captions",
        str(captions),
    ]
    return args + (["--images", str(images)] if images else [])


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


class Snapshots:
    """What an index answers, with query vectors encoded once (no encoder load per look)."""

    def __init__(self, tiny_clip_dir: Path, photo: Path) -> None:
        from retrieval.encoders.registry import load_clip_encoder

        encoder = load_clip_encoder("open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")
        self.text_queries = encoder.encode_texts(QUERIES)
        self.image_query = encoder.encode_images([retrieval.sources.images.load_image(photo).image])

    def take(self, path: Path) -> dict:
        index = retrieval.open_index(path, device="cpu")
        counts = index.manifest["counts"]
        items = {kind: index.items(kind)["id"] for kind in ("image", "caption")}
        assert [len(items["image"]), len(items["caption"])] == [counts["image"], counts["caption"]]
        _, images = index.search_vectors("image", self.text_queries, "text", 5)
        _, captions = index.search_vectors("caption", self.image_query, "image", 5)
        assert len(index.errors()) == index.manifest["errors"]
        return {
            "build_id": index.manifest["build_id"],
            "counts": counts,
            "text_to_image": [[items["image"][p] for p in row] for row in images],
            "image_to_caption": [items["caption"][p] for p in captions[0]],
            "item_ids": items,
        }


def _same_content(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "build_id"} == {k: v for k, v in b.items() if k != "build_id"}


def _check_only_the_committed_build_is_left(index: Path) -> None:
    manifest = json.loads((index / MANIFEST_NAME).read_text())
    files = {p.relative_to(index).as_posix() for p in index.rglob("*") if p.is_file() or p.is_symlink()}
    assert files == set(manifest["checksums"]) | {"manifest.json", "errors.jsonl"}, sorted(files)
    assert all(manifest["build_id"] in rel for rel in manifest["checksums"])
    assert not any(p.name.endswith(".tmp") or p.name == ".lock" for p in index.rglob("*"))


@pytest.fixture(scope="module")
def big_collection(tmp_path_factory) -> Path:
    """20 COCO photos and their pairs file: a rebuild long enough to be killed in every phase."""
    require_shared_data()
    root = tmp_path_factory.mktemp("big")
    rows = coco_pairs(20)
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"image": str(COCO / row["image"]), "caption": row["caption"]}) + "\n")
    return root


def test_sigkill_at_every_commit_step_and_mid_embedding(tmp_path, tiny_clip_dir, small_collection, big_collection):
    index = tmp_path / "index"
    snapshots = Snapshots(
        tiny_clip_dir,
        small_collection / "images" / sorted(p.name for p in (small_collection / "images").glob("0*.jpg"))[0],
    )
    retrieval.build_index(
        captions=[small_collection / "pairs.jsonl"],
        index=index,
        encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
        embed=EmbedOptions(batch_size=2, workers=0, progress=False),
    )
    old = snapshots.take(index)
    assert old["counts"] == {"image": 6, "caption": 30}
    rebuild = _cli(index, tiny_clip_dir, None, big_collection / "pairs.jsonl")
    rng = random.Random(20240611)
    new: dict | None = None
    survived = 0

    def check(state: dict, where: str) -> str:
        nonlocal new
        if state["build_id"] == old["build_id"]:
            assert state == old, f"{where}: the previous index changed"
            return "old"
        assert state["counts"] == {"image": 20, "caption": len(coco_pairs(20))}, where
        new = new or state
        assert _same_content(state, new), f"{where}: the new build answers differently"
        return "new"

    # 1. deterministic kill points: stop before/after every rename and unlink, check, go on; kill at one
    log = tmp_path / "crashpoints.log"
    env = _child_env() | {"CRASHPOINT_DIR": str(index), "CRASHPOINT_LOG": str(log)}
    boot = tmp_path / "crashpoint_boot.py"
    boot.write_text(BOOTSTRAP)
    points: list[tuple[str, str]] = []
    kill_at = None
    with hostile.time_limit(240, "the stopped build"), open(tmp_path / "child.err", "wb") as child_err:
        child = subprocess.Popen(
            [sys.executable, str(boot)] + rebuild,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=child_err,
        )
        while True:
            _, status = os.waitpid(child.pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                break
            point = log.read_text().splitlines()[-1]
            points.append((point, check(snapshots.take(index), point)))
            if kill_at is None and point == "before-replace manifest.json":
                kill_at = len(points) + rng.randrange(2, 8)  # somewhere in the cleanup after the commit
            if len(points) == kill_at:
                os.kill(child.pid, signal.SIGKILL)
                os.kill(child.pid, signal.SIGCONT)
                os.waitpid(child.pid, 0)
                break
            os.kill(child.pid, signal.SIGCONT)
        child.returncode = 0  # reaped above
    assert len(points) > 16, (points, (tmp_path / "child.err").read_text()[-2000:])
    kinds = [point.split()[0] for point, _ in points]
    assert {"before-replace", "after-replace", "before-unlink", "after-unlink"} <= set(kinds)
    phases = [phase for _, phase in points]
    first_new = phases.index("new")
    assert points[first_new - 1][0] == "before-replace manifest.json" and set(phases[:first_new]) == {"old"}
    assert set(phases[first_new:]) == {"new"}
    survived += 1
    assert check(snapshots.take(index), "after the kill in the cleanup") == "new"

    # 2. a kill during the commit, before the manifest rename: the index is rolled back to the previous one,
    # the top-level errors.jsonl included (it is written after the manifest)
    _rebuild_small(index, tiny_clip_dir, small_collection)
    old = snapshots.take(index)
    log.write_text("")
    with hostile.time_limit(240, "the second stopped build"):
        child = subprocess.Popen(
            [sys.executable, str(boot)] + rebuild, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        old_errors = (index / ERRORS_NAME).read_bytes()
        stop_before = rng.choice(["before-replace items/*-errors.jsonl", "before-replace manifest.json"])
        while True:
            _, status = os.waitpid(child.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), "the build finished without reaching its commit"
            last = log.read_text().splitlines()[-1]
            if last == stop_before or (
                stop_before.startswith("before-replace items/")
                and last.endswith("-errors.jsonl")
                and last.startswith("before-replace items/")
            ):
                os.kill(child.pid, signal.SIGKILL)
                os.kill(child.pid, signal.SIGCONT)
                os.waitpid(child.pid, 0)
                break
            os.kill(child.pid, signal.SIGCONT)
        child.returncode = 0
    assert check(snapshots.take(index), f"killed at {stop_before}") == "old"
    assert (index / ERRORS_NAME).read_bytes() == old_errors
    assert list(index.rglob(".*.tmp")), "the killed commit should have left its temporary file"
    survived += 1

    # 3. plain cli.py processes killed mid-embedding, after a seeded number of its 10 image batches
    outcomes = []
    for attempt, batches in enumerate(sorted(rng.sample(range(1, 11), 4))):
        child = subprocess.Popen(
            [sys.executable] + rebuild,
            env=_child_env() | {PAUSE_ENV: str(batches)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"attempt {attempt}: the build ended before its batch {batches}"
        os.killpg(child.pid, signal.SIGKILL)
        os.killpg(child.pid, signal.SIGCONT)
        os.waitpid(child.pid, 0)
        child.returncode = -signal.SIGKILL
        survived += 1
        phase = check(snapshots.take(index), f"kill {attempt} after batch {batches}")
        assert phase == "old", f"kill {attempt} after batch {batches}: the build was not committed, yet {phase}"
        outcomes.append(f"batch {batches}:killed->{phase}")

    # 4. rerunning the command completes the build and leaves nothing else behind
    subprocess.run([sys.executable] + rebuild, env=_child_env(), check=True, capture_output=True, timeout=300)
    final = snapshots.take(index)
    assert check(final, "the rerun") == "new" and final["build_id"] != old["build_id"]
    _check_only_the_committed_build_is_left(index)
    hits = retrieval.open_index(index, device="cpu").text_to_image(QUERIES[0], k=5)
    assert [hit.id for hit in hits] == final["text_to_image"][0]
    print(f"\nSIGKILL runs survived: {survived}; stop points checked: {len(points)}; mid-embedding: {outcomes}")
    print("\n".join(f"  {point}: {phase}" for point, phase in points))


def _rebuild_small(index: Path, tiny_clip_dir: Path, small_collection: Path) -> None:
    retrieval.build_index(
        captions=[small_collection / "pairs.jsonl"],
        index=index,
        encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
        embed=EmbedOptions(batch_size=2, workers=0, progress=False),
    )


def test_leftovers_of_a_killed_first_build_do_not_block_the_rerun(tmp_path, tiny_clip_dir, small_collection):
    """A first build killed at its commit leaves data files, temporaries and a stale lock, but no manifest."""
    index = tmp_path / "fresh"
    (index / "items").mkdir(parents=True)
    (index / "items" / "b20240101T000000-abcdef-images.parquet").write_bytes(b"half written")
    (index / "items" / ".b20240101T000000-abcdef-captions.parquet.x1.tmp").write_bytes(b"half")
    (index / ".manifest.json.k3j4.tmp").write_text('{"format": 1, "kin')
    (index / ".errors.jsonl.a8b9.tmp").write_text("")
    (index / ".lock").write_text("999999\n")  # a dead build's pid; the kernel lock died with it
    with pytest.raises(retrieval.IndexFormatError, match="no manifest"):
        retrieval.open_index(index)
    built = retrieval.build_index(
        captions=[small_collection / "captions.txt"],
        index=index,
        encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
        embed=EmbedOptions(batch_size=4, workers=0, progress=False),
    )
    assert built.manifest["counts"]["caption"] == 2
    _check_only_the_committed_build_is_left(index)


def test_a_vector_shard_cut_short_by_a_crash_is_never_read(tmp_path):
    """Data files are renamed into place only when complete: a partial write is a temporary file."""
    from retrieval.store.reader import StoreReader
    from retrieval.store.writer import StoreWriter

    writer = StoreWriter(tmp_path, kind="index")
    rel = writer.write_array("vectors/clip", "image-00000", np.ones((3, 4), np.float16))
    writer.commit({"files": {"vectors": [rel]}})
    assert StoreReader(tmp_path, kind="index").read_array(rel).shape == (3, 4)
    assert not list(tmp_path.rglob("*.tmp"))


def _stop_at_every_point(command: list[str], index: Path, tmp_path: Path, check) -> list[tuple[str, str]]:
    """Run ``cli.py`` under the crash-point bootstrap, checking the index at every rename and unlink."""
    log = tmp_path / "update-points.log"
    log.write_text("")
    boot = tmp_path / "crashpoint_boot.py"
    boot.write_text(BOOTSTRAP)
    env = _child_env() | {"CRASHPOINT_DIR": str(index), "CRASHPOINT_LOG": str(log)}
    points = []
    with hostile.time_limit(240, "the stopped update"), open(tmp_path / "update.err", "wb") as child_err:
        child = subprocess.Popen(
            [sys.executable, str(boot), str(ROOT / "cli.py")] + command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=child_err,
        )
        while True:
            _, status = os.waitpid(child.pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                assert os.WEXITSTATUS(status) == 0, (tmp_path / "update.err").read_text()[-2000:]
                break
            point = log.read_text().splitlines()[-1]
            points.append((point, check(point)))
            os.kill(child.pid, signal.SIGCONT)
        child.returncode = 0
    return points


def test_add_and_remove_are_atomic_at_every_commit_step(tmp_path, tiny_clip_dir, small_collection, big_collection):
    """Readers see the old state or the new one at every instant an add or a remove could be killed."""
    index = tmp_path / "index"
    retrieval.build_index(
        captions=[small_collection / "pairs.jsonl"],
        index=index,
        encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
        embed=EmbedOptions(batch_size=2, workers=0, progress=False),
    )
    snapshots = Snapshots(
        tiny_clip_dir,
        small_collection / "images" / sorted(p.name for p in (small_collection / "images").glob("0*.jpg"))[0],
    )

    def state(path: Path) -> dict:
        opened = retrieval.open_index(path, device="cpu")
        ids = {kind: opened.items(kind)["id"] for kind in ("image", "caption")}
        _, images = opened.search_vectors("image", snapshots.text_queries, "text", 5)
        _, captions = opened.search_vectors("caption", snapshots.image_query, "image", 5)
        return {
            "build_id": opened.manifest["build_id"],
            "counts": opened.manifest["counts"],
            "t2i": [[ids["image"][p] for p in row] for row in images],
            "i2c": [ids["caption"][p] for p in captions[0]],
        }

    for command, expected_counts in (
        (
            ["add", "--index", str(index), "--captions", str(big_collection / "pairs.jsonl"), "-q", "--workers", "0"],
            {"image": 26, "caption": 130},
        ),
        (
            ["remove", "--index", str(index), "--path", str(small_collection / "pairs.jsonl")],
            {"image": 26, "caption": 100},
        ),
    ):
        old = state(index)
        seen: dict = {}

        # called at every stop of this command's run (_stop_at_every_point below): bound to its states
        def check(point: str, old: dict = old, expected_counts: dict = expected_counts, seen: dict = seen) -> str:
            now = state(index)
            if now["build_id"] == old["build_id"]:
                assert now == old, f"{point}: the previous state changed"
                return "old"
            assert now["counts"] == expected_counts, point
            seen.setdefault("new", now)
            assert now == seen["new"], f"{point}: the new state answers differently"
            return "new"

        points = _stop_at_every_point(command, index, tmp_path, check)
        phases = [phase for _, phase in points]
        assert "old" in phases and "new" in phases, points
        first_new = phases.index("new")
        assert points[first_new - 1][0] == "before-replace manifest.json" and set(phases[first_new:]) == {"new"}
        final = json.loads((index / MANIFEST_NAME).read_text())
        files = {p.relative_to(index).as_posix() for p in index.rglob("*") if p.is_file()}
        assert files == set(final["checksums"]) | {"manifest.json", "errors.jsonl"}, sorted(files)


ERRORS_KILL = r"""
import os, sys
import retrieval.store.writer as writer

root, where = sys.argv[1], sys.argv[2]
commit_manifest = writer.write_json_atomic

def killed(*args, **kwargs):
    if where == "after-manifest":
        commit_manifest(*args, **kwargs)
    os._exit(137)  # as a SIGKILL: no cleanup

writer.write_json_atomic = killed  # the manifest commit
writer.StoreWriter(root, kind="index").commit({"files": {}}, errors=[{"path": "b.jpg", "reason": "second build"}])
"""


def _committed_errors(root: Path) -> bytes:
    return (root / json.loads((root / MANIFEST_NAME).read_text())["errors_file"]).read_bytes()


@pytest.mark.parametrize("where", ["before-manifest", "after-manifest"])
def test_errors_jsonl_never_describes_an_uncommitted_build(tmp_path, where):
    """The top-level errors.jsonl changes only with the manifest: a writer killed just before its commit
    leaves the committed build's copy; one killed just after leaves the previous build's, which the next
    writer puts right as soon as it takes the lock."""
    from retrieval.store.writer import StoreWriter

    root = tmp_path / "index"
    first = StoreWriter(root, kind="index").commit({"files": {}}, errors=[{"path": "a.jpg", "reason": "first build"}])
    first_errors = (root / ERRORS_NAME).read_bytes()
    assert b"first build" in first_errors and first_errors == _committed_errors(root)

    killed = subprocess.run([sys.executable, "-c", ERRORS_KILL, str(root), where], env=_child_env(), timeout=120)
    assert killed.returncode == 137
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    if where == "before-manifest":
        assert manifest["build_id"] == first["build_id"]
        assert (root / ERRORS_NAME).read_bytes() == first_errors, "errors.jsonl describes a build never committed"
        return
    assert manifest["build_id"] != first["build_id"] and b"second build" in _committed_errors(root)
    assert (root / ERRORS_NAME).read_bytes() in (first_errors, _committed_errors(root))  # both were committed
    with writer_lock(root):  # the next writer
        assert (root / ERRORS_NAME).read_bytes() == _committed_errors(root)


def test_sync_errors_copy_puts_a_stale_copy_right(tmp_path):
    from retrieval.store.writer import StoreWriter, sync_errors_copy

    root = tmp_path / "index"
    StoreWriter(root, kind="index").commit({"files": {}}, errors=[{"path": "a.jpg", "reason": "unreadable"}])
    (root / ERRORS_NAME).write_text("stale\n")
    assert sync_errors_copy(root) and (root / ERRORS_NAME).read_bytes() == _committed_errors(root)
    assert not sync_errors_copy(root)  # already in step: nothing written
    assert not sync_errors_copy(tmp_path / "nothing-committed")
