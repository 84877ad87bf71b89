"""Reading many shard files in order: one after another while the reads come from memory, several
at once where they wait for storage.

A shard scan reads a header window per sample. From the page cache that is CPU work that holds the
GIL, and threads only add hand-offs, so they make a warm scan slower. Where each read waits for
storage (a network file system, a spinning disk), the waits of several shards overlap. So the first
files are read one by one, timing wall clock against this process's CPU; if the reads waited more
than they computed, the rest go to a thread pool. A local disk whose cold reads are mostly the
kernel's CPU work stays on one thread. Results come back in the order of the files either way.
Figures for both cases: benchmarks/SHARDS.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

SCAN_THREADS = 8  # files read at once once reads wait for storage
PROBE_FILES = 4  # files read one by one first, to tell memory from storage
WAITING_SHARE = 0.5  # reads "wait" when this process's CPU time is below this share of the wall time

F = TypeVar("F")
T = TypeVar("T")


def read_in_order(files: Sequence[F], read: Callable[[F], T], threads: int = SCAN_THREADS) -> Iterator[T]:
    """``read(file)`` for each of ``files``, yielded in order (see the module docstring)."""
    probe = list(files[:PROBE_FILES])
    wall, cpu = time.perf_counter(), time.process_time()
    for file in probe:
        yield read(file)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rest = files[len(probe) :]
    if threads <= 1 or len(rest) < 2 or not reads_wait(wall, cpu):
        for file in rest:
            yield read(file)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(rest)), thread_name_prefix="shard-scan") as pool:
        yield from pool.map(read, rest)


def reads_wait(wall_seconds: float, cpu_seconds: float) -> bool:
    """Whether work that took ``wall_seconds`` and ``cpu_seconds`` of this process's CPU mostly waited."""
    return wall_seconds > 0 and cpu_seconds < WAITING_SHARE * wall_seconds
