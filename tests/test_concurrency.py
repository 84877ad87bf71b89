"""Concurrent use of one index: readers while a writer rebuilds, and two writers at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import hostile
import numpy as np
import pytest
from conftest import TEST_DEVICE

import retrieval
from retrieval import EmbedOptions, EncoderChoice
from retrieval.core.errors import IndexLockedError
from retrieval.store.locking import LOCK_NAME, WriterLock, writer_lock

ROOT = Path(__file__).resolve().parents[1]
QUIET = EmbedOptions(batch_size=4, workers=0, progress=False)


def _clip(tiny_clip_dir: Path) -> EncoderChoice:
    return EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device=TEST_DEVICE)


def _look(path: Path, query: np.ndarray) -> str:
    """Open the index and check it is one consistent build; returns its build id."""
    index = retrieval.open_index(path, device=TEST_DEVICE)
    counts = index.manifest["counts"]
    for kind in ("image", "caption"):
        ids = index.items(kind)["id"]
        assert len(ids) == counts[kind], f"{kind}: {len(ids)} items, manifest says {counts[kind]}"
        if counts[kind]:
            assert index.vector_index(f"{index.manifest['spaces'][kind]}/{kind}").ntotal == counts[kind]
            scores, positions = index.search_vectors(kind, query, "text", 3)
            assert positions.shape == (1, min(3, counts[kind])) and (positions < counts[kind]).all()
            assert [ids[p] for p in positions[0]]
    assert len(index.errors()) == index.manifest["errors"]
    return index.manifest["build_id"]


READER_PROCESS = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[3])
    import retrieval
    from test_concurrency import _look
    path, stop = sys.argv[1], sys.argv[2]
    query = np.ones((1, 32), np.float32) / np.sqrt(32)
    builds, looks, failures = set(), 0, []
    import os
    builds.add(_look(path, query))
    print("ready", flush=True)
    while not os.path.exists(stop):
        try:
            builds.add(_look(path, query))
            looks += 1
        except Exception as e:
            failures.append(f"{type(e).__name__}: {e}")
    print(json.dumps({"looks": looks, "builds": len(builds), "failures": failures[:5]}))
    """
)


def test_readers_see_one_consistent_build_while_a_writer_rebuilds(tmp_path, tiny_clip_dir, small_collection):
    index = tmp_path / "index"
    first = retrieval.build_index(
        images=[small_collection / "images"],
        captions=[small_collection / "pairs.jsonl"],
        index=index,
        encoders=_clip(tiny_clip_dir),
        embed=QUIET,
    )
    query = first.text_encoder.encode_texts(["a plate of food"])
    early = retrieval.open_index(index, device=TEST_DEVICE)  # opened now, read only after every rebuild below
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER_PROCESS, str(index), str(stop), str(ROOT / "tests")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout.readline().strip() == "ready", reader.stderr.read()[-2000:]
    failures: list[str] = []
    seen: list[str] = []
    done = threading.Event()

    def read_in_a_loop() -> None:
        while not done.is_set():
            try:
                seen.append(_look(index, query))
            except Exception as e:  # any failure is what this test looks for
                failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=read_in_a_loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        with hostile.time_limit(240, "the rebuilds"):
            for round_ in range(4):
                images = [small_collection / "images"] if round_ % 2 else []
                captions = [small_collection / ("pairs.jsonl" if round_ % 2 else "captions.txt")]
                retrieval.build_index(
                    images=images, captions=captions, index=index, encoders=_clip(tiny_clip_dir), embed=QUIET
                )
    finally:
        done.set()
        stop.write_text("")
        for thread in threads:
            thread.join(timeout=60)
        out, err = reader.communicate(timeout=120)
    assert not failures, failures[:5]
    report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"failures": [err[-2000:]]}
    assert not report["failures"], report
    assert len(seen) > 10 and len(set(seen)) >= 2, (len(seen), len(set(seen)))  # the readers really overlapped
    assert report["looks"] >= 1
    # the index opened before the rebuilds still answers from its own build, although its files are deleted
    assert not (index / early.manifest["files"]["faiss"]["clip/image"]).exists()
    assert _look(index, query) != first.manifest["build_id"]
    assert early.manifest["build_id"] == first.manifest["build_id"]
    assert early.manifest["counts"] == {"image": 6, "caption": 30}
    assert len(early.items("image")["id"]) == 6
    assert [h.id for h in early.text_to_image("a plate of food", k=3)] == [
        h.id for h in first.text_to_image("a plate of food", k=3)
    ]
    assert len(early.errors()) == 1


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path, tiny_clip_dir, small_collection):
    index = tmp_path / "index"
    retrieval.build_index(
        captions=[small_collection / "captions.txt"], index=index, encoders=_clip(tiny_clip_dir), embed=QUIET
    )
    with writer_lock(index):
        started = time.monotonic()
        with pytest.raises(IndexLockedError, match=rf"index is locked by another build \(pid {os.getpid()}\)"):
            retrieval.build_index(
                captions=[small_collection / "pairs.jsonl"], index=index, encoders=_clip(tiny_clip_dir), embed=QUIET
            )
        assert time.monotonic() - started < 2
        with pytest.raises(IndexLockedError):
            retrieval.build_anchors(
                [small_collection / "pairs.jsonl"], index, EncoderChoice(image="efficientnet-lite0", text="minilm")
            )
        # readers never wait for the lock
        assert retrieval.open_index(index).manifest["counts"]["caption"] == 2
        # the command line: exit code 6 and one line
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "cli.py"),
                "build-index",
                "--index",
                str(index),
                "--captions",
                str(small_collection / "captions.txt"),
                "--encoder",
                "open_clip:tiny",
                "--checkpoint",
                str(tiny_clip_dir),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == IndexLockedError.exit_code == 6
        assert f"index is locked by another build (pid {os.getpid()})" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (index / LOCK_NAME).exists()
    assert retrieval.open_index(index).manifest["counts"]["caption"] == 2  # untouched by the refused writers


def test_two_builds_started_together_one_wins_one_is_refused(tmp_path, tiny_clip_dir, small_collection):
    index = tmp_path / "fresh"
    outcomes: list[object] = [None, None]
    barrier = threading.Barrier(2)

    def build(slot: int) -> None:
        barrier.wait()
        try:
            outcomes[slot] = retrieval.build_index(
                images=[small_collection / "images"], index=index, encoders=_clip(tiny_clip_dir), embed=QUIET
            )
        except Exception as e:
            outcomes[slot] = e

    threads = [threading.Thread(target=build, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    refused = [o for o in outcomes if isinstance(o, IndexLockedError)]
    built = [o for o in outcomes if isinstance(o, retrieval.Index)]
    assert len(refused) == 1 and len(built) == 1, outcomes
    assert retrieval.open_index(index).manifest["counts"]["image"] == 6


def test_the_lock_is_exclusive_under_contention(tmp_path):
    """Many threads (each its own open file) take and release the lock; never two holders at once."""
    inside, entries, refusals = [0], [0], [0]
    guard = threading.Lock()

    def hammer() -> None:
        for _ in range(150):
            try:
                with writer_lock(tmp_path / "d"):
                    with guard:
                        inside[0] += 1
                        assert inside[0] == 1, "two writers hold the lock"
                        entries[0] += 1
                    time.sleep(0.0005)
                    with guard:
                        inside[0] -= 1
            except IndexLockedError:
                with guard:
                    refusals[0] += 1

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert entries[0] + refusals[0] == 600 and entries[0] > 20 and refusals[0] > 0
    assert not (tmp_path / "d" / LOCK_NAME).exists()


def test_a_killed_writer_leaves_no_stuck_lock(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from retrieval.store.locking import WriterLock; lock = WriterLock(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)",
            str(index),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(IndexLockedError, match=f"pid {holder.pid}"):
            WriterLock(index)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert (index / LOCK_NAME).read_text().strip() == str(holder.pid)  # stale file, dead pid
    with writer_lock(index) as lock:
        assert lock.held
    assert not (index / LOCK_NAME).exists()


def test_a_failed_build_releases_the_lock(tmp_path, tiny_clip_dir, small_collection, monkeypatch):
    import retrieval.api.build as build_module

    def dies(*args, **kwargs):
        raise RuntimeError("the encoder blew up")

    monkeypatch.setattr(build_module, "embed_images", dies)
    with pytest.raises(RuntimeError, match="blew up"):
        retrieval.build_index(
            images=[small_collection / "images"], index=tmp_path / "i", encoders=_clip(tiny_clip_dir), embed=QUIET
        )
    assert not (tmp_path / "i").exists()  # nothing was written: the directory made for the lock is gone
    monkeypatch.undo()
    retrieval.build_index(
        captions=[small_collection / "captions.txt"], index=tmp_path / "i", encoders=_clip(tiny_clip_dir), embed=QUIET
    )


def test_a_sparse_file_deleted_while_it_loads_is_read_from_its_pinned_descriptor(tmp_path):
    """A newer build's cleanup can land between the reader's check of a file and the load by its name
    (it made a 16-thread test fail once): the load then runs again on the pinned descriptor."""
    import scipy.sparse as sp

    from retrieval.asif.relative import SparseRelativeIndex
    from retrieval.store.reader import StoreReader
    from retrieval.store.writer import StoreWriter

    writer = StoreWriter(tmp_path, kind="index")
    rel = writer.write_sparse("image", SparseRelativeIndex(sp.csr_matrix(np.full((3, 2), 0.5, np.float32))))
    writer.commit({"files": {"relative": rel}}, [])
    reader = StoreReader(tmp_path, kind="index")
    paths: list[Path] = []

    def load_racing_a_cleanup(path: Path) -> SparseRelativeIndex:
        paths.append(path)
        if len(paths) == 1:
            path.unlink()  # the newer build's cleanup, right after the check
        return SparseRelativeIndex.load(path)

    assert (reader.read_sparse(rel, load_racing_a_cleanup).rows.toarray() == 0.5).all()
    assert paths[0] == tmp_path / rel and paths[1] != paths[0]


def test_a_reader_keeps_its_snapshot_after_the_files_are_deleted(tmp_path):
    """Store level, every file type: two commits later the first reader still reads its own build."""
    import pyarrow as pa
    import scipy.sparse as sp

    from retrieval.asif.relative import SparseRelativeIndex
    from retrieval.index.vector_index import build_vector_index
    from retrieval.store.reader import StoreReader
    from retrieval.store.writer import StoreWriter

    def commit(value: float) -> None:
        writer = StoreWriter(tmp_path, kind="index")
        vectors = np.full((3, 4), value, np.float32)
        rows = sp.csr_matrix(np.full((3, 2), value, np.float32))
        files = {
            "vectors": writer.write_vectors("clip", "image", vectors),
            "items": writer.write_table("images", pa.table({"v": [value] * 3})),
            "faiss": writer.write_faiss("clip-image", build_vector_index(vectors)),
            "relative": writer.write_sparse("image", SparseRelativeIndex(rows)),
        }
        writer.commit({"files": files}, [{"value": value}])

    commit(0.5)
    reader = StoreReader(tmp_path, kind="index")
    files = reader.manifest["files"]
    commit(0.25)
    commit(0.125)
    assert not any((tmp_path / rel).exists() for rel in reader.manifest["checksums"])
    assert (reader.read_vectors(files["vectors"]) == 0.5).all()
    assert reader.read_table(files["items"]).column("v").to_pylist() == [0.5] * 3
    assert reader.read_faiss(files["faiss"]).ntotal == 3
    assert (reader.read_sparse(files["relative"], SparseRelativeIndex.load).rows.toarray() == 0.5).all()
    assert reader.read_errors() == [{"value": 0.5}]
    assert StoreReader(tmp_path, kind="index").read_errors() == [{"value": 0.125}]
    reader.close()
    with pytest.raises(retrieval.IndexFormatError, match="closed"):
        reader.read_table(files["items"])


QUERY_THREADS = 16
TEXTS = ["a plate of food", "a man riding a horse"]


def _hits(rows: list) -> tuple[list[list[str]], np.ndarray]:
    return [[hit.id for hit in row] for row in rows], np.array([[hit.score for hit in row] for row in rows])


def _answers(index: retrieval.Index, photos: list[Path]) -> dict[str, tuple]:
    """Every query of ``index`` on every route it has: (ids, scores) per query and route."""
    calls = {
        "text_to_image": lambda route: index.texts_to_images(TEXTS, k=3, options=retrieval.SearchOptions(route=route)),
        "image_to_caption": lambda route: index.images_to_captions(
            photos, k=3, options=retrieval.SearchOptions(route=route)
        ),
        "image_to_image": lambda route: index.images_to_images(
            photos, k=3, options=retrieval.SearchOptions(route=route), exclude_self=True
        ),
        "text_to_caption": lambda route: index.texts_to_captions(
            TEXTS, k=3, options=retrieval.SearchOptions(route=route)
        ),
    }
    return {
        f"{query}/{route}": _hits(call(route)) for query, call in calls.items() for route in index.routes_for(query)
    }


def _same(got: dict[str, tuple], want: dict[str, tuple]) -> bool:
    return got.keys() == want.keys() and all(
        got[key][0] == want[key][0] and np.allclose(got[key][1], want[key][1], atol=1e-5) for key in want
    )


def _count_loads(monkeypatch, counts: dict[tuple, int], guard: threading.Lock) -> None:
    """Count, per part, the loads made by threads named ``query-*`` (each slowed down, to widen any race)."""
    import retrieval.encoders.registry as registry
    from retrieval.asif.relative import SparseRelativeIndex
    from retrieval.store.reader import StoreReader

    def counted(name: str, load, first: int = 1):
        def wrapper(*args, **kwargs):
            if threading.current_thread().name.startswith("query-"):
                key = (
                    name,
                    *(str(a) for a in args[first : first + 1]),
                )  # the file read (a method's args[0] is the reader)
                with guard:
                    counts[key] = counts.get(key, 0) + 1
                time.sleep(0.02)
            return load(*args, **kwargs)

        return wrapper

    for method in ("read_faiss", "vector_source", "read_table", "read_array"):
        monkeypatch.setattr(StoreReader, method, counted(method, getattr(StoreReader, method)))
    monkeypatch.setattr(SparseRelativeIndex, "load", staticmethod(counted("relative", SparseRelativeIndex.load, 0)))
    monkeypatch.setattr(registry, "load_encoders", counted("encoders", registry.load_encoders, 2))


@pytest.mark.parametrize("mode", ["clip", "asif"])
def test_one_index_answers_every_route_from_16_threads_while_it_is_reopened_and_grown(
    mode, tmp_path, request, small_collection, monkeypatch
):
    """16 threads query one cold Index on every route while another thread reopens the path and an add commits."""
    from retrieval.api.update import add_to_index

    path = tmp_path / "index"
    if mode == "clip":
        encoders, anchors = _clip(request.getfixturevalue("tiny_clip_dir")), None
    else:
        encoders, anchors = (
            EncoderChoice(image="efficientnet-lite0", text="minilm", device=TEST_DEVICE),
            "builtin:imagenet",
        )
    retrieval.build_index(
        images=[small_collection / "images"],
        captions=[small_collection / "pairs.jsonl"],
        index=path,
        encoders=encoders,
        anchors=anchors,
        embed=QUIET,
    )
    photos = sorted((small_collection / "images").glob("0*.jpg"))[: 2 if mode == "clip" else 1]
    reference = _answers(retrieval.open_index(path, device=TEST_DEVICE), photos)
    first_build = retrieval.open_index(path).manifest["build_id"]
    shared = retrieval.open_index(path, device=TEST_DEVICE)  # cold: every part loads under the threads below
    counts: dict[tuple, int] = {}
    guard = threading.Lock()
    _count_loads(monkeypatch, counts, guard)
    failures: list[str] = []
    seen: list[tuple[str, dict]] = []
    barrier = threading.Barrier(QUERY_THREADS + 1)
    queries_done, grown = threading.Event(), threading.Event()

    def query(rounds: int) -> None:
        barrier.wait()
        for _ in range(rounds):
            try:
                if not _same(_answers(shared, photos), reference):
                    failures.append("an answer differs from the single-threaded one")
            except Exception as e:  # any failure is what this test looks for
                failures.append(f"{type(e).__name__}: {e}")

    def reopen() -> None:
        barrier.wait()
        while not (queries_done.is_set() and grown.is_set()) or not any(build != first_build for build, _ in seen):
            try:
                opened = retrieval.open_index(path, device=TEST_DEVICE)
                seen.append((opened.manifest["build_id"], _answers(opened, photos)))
            except Exception as e:
                failures.append(f"reopen: {type(e).__name__}: {e}")
                return

    def grow() -> None:
        try:
            add_to_index(path, captions=[small_collection / "captions.txt"], embed=QUIET, device=TEST_DEVICE)
        except Exception as e:
            failures.append(f"add: {type(e).__name__}: {e}")
        grown.set()

    threads = [
        threading.Thread(target=query, args=(3 if mode == "clip" else 1,), name=f"query-{n}")
        for n in range(QUERY_THREADS)
    ]
    threads.append(threading.Thread(target=reopen, name="reopen"))
    for thread in threads:
        thread.start()
    grow()
    with hostile.time_limit(300, "the queries"):
        for thread in threads[:-1]:
            thread.join()
        queries_done.set()
        threads[-1].join()
    assert not failures, failures[:5]
    assert counts and set(counts.values()) == {1}, {
        key: n for key, n in counts.items() if n != 1
    }  # every part loaded once
    assert {key[0] for key in counts} >= {"encoders", "read_faiss", "read_table"} | (
        {"relative"} if mode == "asif" else set()
    )
    final = retrieval.open_index(path, device=TEST_DEVICE)
    assert final.manifest["build_id"] != first_build and final.manifest["counts"]["caption"] == 32
    expected = {first_build: reference, final.manifest["build_id"]: _answers(final, photos)}
    assert {build for build, _ in seen} <= set(expected) and len(seen) >= 2
    assert all(_same(answers, expected[build]) for build, answers in seen)
    assert _same(_answers(shared, photos), reference)  # the shared index still answers from its own build


def test_decoding_and_gathering_leave_the_warnings_of_other_threads_alone(tmp_path, small_collection):
    """Query-path work on other threads neither swallows this thread's warnings nor changes the filters."""
    import warnings

    from retrieval.index.source import VectorSource
    from retrieval.sources.items import load_image

    photo = sorted((small_collection / "images").glob("0*.jpg"))[0]
    np.save(tmp_path / "v.npy", np.ones((64, 8), np.float16))
    stop = threading.Event()
    errors: list[str] = []

    def decode_and_gather() -> None:
        while not stop.is_set():
            try:
                load_image(photo)
                VectorSource([np.load(tmp_path / "v.npy", mmap_mode="r")]).take(np.arange(4))  # fresh: read-only map
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = warnings.filters
        workers = [threading.Thread(target=decode_and_gather) for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            for n in range(3000):
                warnings.warn(f"probe {n}", UserWarning, stacklevel=1)
                if n % 100 == 0:
                    time.sleep(0.001)
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=60)
        probes = [w for w in caught if str(w.message).startswith("probe")]
        assert warnings.filters is filters and warnings.filters[0][0] == "always"
    assert not errors, errors[:3]
    assert len(probes) == 3000, f"{3000 - len(probes)} warnings of this thread were swallowed by the others"


def test_once_cache_computes_a_key_once_for_many_threads_and_retries_after_a_failure():
    from retrieval.api.lazy import OnceCache

    cache, calls, results = OnceCache(), [], []
    barrier = threading.Barrier(8)

    def slow() -> object:
        calls.append(1)
        time.sleep(0.05)
        return object()

    def ask() -> None:
        barrier.wait()
        results.append(cache.get("key", slow))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(calls) == 1 and len(results) == 8 and all(value is results[0] for value in results)

    def fails() -> object:
        raise RuntimeError("not now")

    with pytest.raises(RuntimeError, match="not now"):
        cache.get("other", fails)
    assert cache.get("other", lambda: 5) == 5 and cache.get("other", fails) == 5
