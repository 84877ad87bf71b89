"""Helpers shared by the ANN benchmarks: machine description, process memory, timing, tables."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MB = 1 << 20


def machine() -> dict[str, Any]:
    import faiss

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    total = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(total / (1 << 30), 1),
        "gpu": "none",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
    }


def library_fingerprint(root: Path) -> dict[str, str]:
    """sha1 of the library files benchmarked (they change while the benchmarks run), and the git HEAD."""
    import hashlib
    import subprocess

    out = {
        name: hashlib.sha1((root / "retrieval" / name).read_bytes()).hexdigest()[:12]
        for name in ("index/spec.py", "index/vector_index.py", "index/recall.py")
    }
    with contextlib.suppress(OSError):
        out["git_head"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    return out


def proc_status() -> dict[str, int]:
    """RssAnon / RssFile / VmRSS / VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def trim() -> None:
    """Return freed heap memory to the OS (so RSS deltas measure what is held, not what glibc caches)."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def anon_bytes() -> int:
    trim()
    return proc_status().get("RssAnon", 0)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryMonitor:
    """Samples RssAnon and RssFile every ``interval`` s in a thread; ``peak()`` since the last ``reset()``."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self.reset()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        status = proc_status()
        self.anon = status.get("RssAnon", 0)
        self.file = status.get("RssFile", 0)
        self.total = status.get("VmRSS", 0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            status = proc_status()
            self.anon = max(self.anon, status.get("RssAnon", 0))
            self.file = max(self.file, status.get("RssFile", 0))
            self.total = max(self.total, status.get("VmRSS", 0))

    def peak(self) -> dict[str, int]:
        return {"anon": self.anon, "file": self.file, "total": self.total}

    def stop(self) -> None:
        self._stop.set()


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def single_latencies(fn: Callable[[np.ndarray], Any], queries: np.ndarray) -> list[float]:
    """Seconds of ``fn(q[None])`` for each query row, one at a time."""
    times = []
    for q in queries:
        q = q[None, :]
        started = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - started)
    return times


def interleaved_latencies(
    fns: dict[str, Callable[[np.ndarray], Any]], queries: np.ndarray, flip: bool = False
) -> dict[str, list[float]]:
    """Seconds of each ``fn(q[None])`` per query row, the searchers taking turns on every query (the order
    alternating query by query), so drift in machine speed over a run falls on all of them alike."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for number, q in enumerate(queries):
        q = q[None, :]
        order = names if (number % 2 == 0) != flip else names[::-1]
        for name in order:
            started = time.perf_counter()
            fns[name](q)
            times[name].append(time.perf_counter() - started)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-style markdown table (readable in a terminal too)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return (
            "| "
            + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            + " |"
        )

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "to_json"):
        return value.to_json()
    return str(value)


class MemoryCgroup:
    """A memory cgroup under this process's own (v2 if it has the memory controller, else v1); a context manager."""

    def __init__(self, limit: int, name: str) -> None:
        self.limit = limit
        self.version, self.path = self._locate(name)

    @staticmethod
    def _locate(name: str) -> tuple[int, Path]:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        for line in lines:  # v2: "0::/path", usable when its memory controller is enabled
            number, controllers, path = line.split(":", 2)
            if number == "0":
                for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                    controllers_file = root / path.lstrip("/") / "cgroup.controllers"
                    if controllers_file.exists() and "memory" in controllers_file.read_text().split():
                        return 2, root / path.lstrip("/") / name
        for line in lines:  # v1: "N:memory:/path"
            number, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                root = Path("/sys/fs/cgroup/memory")
                if (root / path.lstrip("/") / "memory.limit_in_bytes").exists():
                    return 1, root / path.lstrip("/") / name
        raise RuntimeError(
            "no writable memory cgroup (v2 memory controller or v1 memory mount) for this process; "
            "try: systemd-run --scope -p MemoryMax=1G ... or docker run --memory 1g ..."
        )

    def __enter__(self) -> MemoryCgroup:
        self.path.mkdir()
        if self.version == 2:
            (self.path / "memory.max").write_text(str(self.limit))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                # no swapping out of the limit either (there is no swap here anyway)
                with contextlib.suppress(OSError):
                    swap.write_text(str(self.limit))
        return self

    def join(self) -> None:
        """Called in the child between fork and exec: move it into this cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def stats(self) -> dict[str, Any]:
        def read(name: str) -> str | None:
            return (self.path / name).read_text().strip() if (self.path / name).exists() else None

        if self.version == 2:
            events = dict(line.split() for line in (read("memory.events") or "").splitlines())
            return {
                "limit": read("memory.max"),
                "peak_bytes": int(read("memory.peak") or 0) or None,
                "oom_kill": int(events.get("oom_kill", 0)),
                "events": events,
            }
        oom = dict(line.split() for line in (read("memory.oom_control") or "").splitlines())
        return {
            "limit": int(read("memory.limit_in_bytes")),
            "peak_bytes": int(read("memory.max_usage_in_bytes")),
            "failcnt": int(read("memory.failcnt")),
            "oom_kill": int(oom.get("oom_kill", 0)),
        }

    def __exit__(self, *exc: Any) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_limited(limit: int | None, args: list[str], name: str) -> dict[str, Any]:
    """Run ``args`` in a fresh memory cgroup limited to ``limit`` bytes (no cgroup when None); parse its tagged
    JSON lines."""
    import subprocess

    if limit is None:
        started = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True)
        return _child_output(done, time.perf_counter() - started, {}, None)
    with MemoryCgroup(limit, name) as group:
        started = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True, preexec_fn=group.join)
        wall = time.perf_counter() - started
        stats = group.stats()
    return _child_output(done, wall, stats, group.version)


def _child_output(done: Any, wall: float, stats: dict[str, Any], version: int | None) -> dict[str, Any]:
    import signal

    out: dict[str, Any] = {
        "returncode": done.returncode,
        "wall_s": wall,
        "cgroup": stats,
        "cgroup_version": version,
        "stderr_tail": done.stderr[-1500:],
    }
    if done.returncode < 0:
        out["signal"] = signal.Signals(-done.returncode).name
    for line in done.stdout.splitlines():
        tag, _, payload = line.partition(" ")
        if tag in ("LOADED", "CHILD_RESULT"):
            out[tag.lower()] = json.loads(payload)
    return out
