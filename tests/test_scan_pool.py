"""Shard files read one by one from memory, several at once where reads wait (scan_pool)."""

from __future__ import annotations

import threading
import time

from retrieval.sources.scan_pool import PROBE_FILES, read_in_order, reads_wait

FILES = list(range(PROBE_FILES + 12))
WAIT = 0.02  # seconds a "read from storage" sleeps


def _recording(work, in_flight: list[int] | None = None):
    """A read that records its thread per file and, in ``in_flight``, how many reads ran at once at most."""
    threads: dict[int, str] = {}
    lock, running = threading.Lock(), [0]

    def read(file: int) -> int:
        threads[file] = threading.current_thread().name
        with lock:
            running[0] += 1
            if in_flight is not None:
                in_flight.append(running[0])
        try:
            work()
        finally:
            with lock:
                running[0] -= 1
        return file * 10

    return read, threads


def _busy() -> None:
    end = time.process_time() + 0.003
    while time.process_time() < end:
        pass


def test_reads_that_wait_go_to_threads_after_the_probe_and_come_back_in_order():
    in_flight: list[int] = []
    read, threads = _recording(lambda: time.sleep(WAIT), in_flight)
    got = list(read_in_order(FILES, read, threads=8))
    assert got == [file * 10 for file in FILES]
    probed = [threads[file] for file in FILES[:PROBE_FILES]]
    pooled = [threads[file] for file in FILES[PROBE_FILES:]]
    assert all(name == threading.current_thread().name for name in probed)
    assert all(name.startswith("shard-scan") for name in pooled)
    assert max(in_flight[:PROBE_FILES]) == 1 and max(in_flight) > 1  # the probe one by one, then reads overlap


def test_reads_that_compute_stay_on_the_calling_thread():
    read, threads = _recording(_busy)
    assert list(read_in_order(FILES, read, threads=8)) == [file * 10 for file in FILES]
    assert set(threads.values()) == {threading.current_thread().name}


def test_one_thread_or_few_files_never_start_a_pool():
    read, threads = _recording(lambda: time.sleep(WAIT))
    assert list(read_in_order(FILES, read, threads=1)) == [file * 10 for file in FILES]
    assert list(read_in_order(FILES[: PROBE_FILES + 1], read, threads=8)) == [
        file * 10 for file in FILES[: PROBE_FILES + 1]
    ]
    assert set(threads.values()) == {threading.current_thread().name}


def test_waiting_is_cpu_below_half_the_wall_clock():
    assert reads_wait(1.0, 0.2) and not reads_wait(1.0, 0.8) and not reads_wait(0.0, 0.0)


def test_a_long_shard_scan_shows_a_progress_bar_and_a_quiet_one_does_not(tmp_path, monkeypatch, capsys):
    import io
    import tarfile

    from retrieval.sources import inputs

    shards = []
    for n in range(3):
        shards.append(tmp_path / f"{n:05d}.tar")
        with tarfile.open(shards[-1], "w") as tar:
            for ext, data in (("jpg", b"\xff\xd8 not really a jpeg"), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{n:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(inputs, "PROGRESS_DELAY", 0.0)
    got = inputs.read_image_sources([str(tmp_path / "{00000..00002}.tar")], progress=True)
    assert len(got.images) == 3
    shown = capsys.readouterr().err
    assert "scanning shards" in shown and "3/3" in shown and "images=3" in shown
    inputs.read_image_sources([str(tmp_path / "{00000..00002}.tar")], progress=False)
    assert capsys.readouterr().err == ""
