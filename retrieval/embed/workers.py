"""How the embedding stage uses the machine: how many DataLoader workers, and whether they encode.

On a GPU the main process encodes the batches the workers decode. On the CPU each worker can
also encode its own batches with a single-threaded copy of the encoder (a *replica*, shared
copy-on-write by fork): see :func:`use_replicas`.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Any

from retrieval.core.errors import InputError

__all__ = ["MAX_AUTO_REPLICAS", "MAX_AUTO_WORKERS", "SMALL_COLLECTION", "fork_context", "resolve_workers", "use_replicas"]

SMALL_COLLECTION = 64  # below this many images, worker processes cost more than they save
MAX_AUTO_WORKERS = 8  # decode-only workers: more rarely help one encoder keep up
MAX_AUTO_REPLICAS = 32  # workers that also encode: one per core


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int | str, n_items: int, replicas: bool = False) -> int:
    """Number of DataLoader worker processes: 'auto' gives large collections one per core
    (at most MAX_AUTO_WORKERS, or MAX_AUTO_REPLICAS when the workers also encode).

    One per core, not one per spare core: on the 2-core CPU EfficientNet-Lite0 embedded 109 img/s
    with 2 workers and 89 with 1, ViT-B/32 35 and 34 (workers sleep while the batch queue is full).
    """
    if workers != "auto":
        return int(workers)
    if n_items < SMALL_COLLECTION:
        return 0
    return max(1, min(MAX_AUTO_REPLICAS if replicas else MAX_AUTO_WORKERS, _cores()))


def fork_context() -> Any:
    """The 'fork' multiprocessing context on Linux, else None (replicas are shared by forking)."""
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None


def use_replicas(option: bool | None, device: str, workers: int | str, n_items: int, compile: bool = False) -> bool:
    """Whether the DataLoader workers encode too, each with its own single-threaded encoder copy.

    Only for CPU encoders, and only where workers are forked (Linux): the copy is then the
    parent's memory, shared copy-on-write, and a forked worker must stay single-threaded
    (OpenMP hangs in a child whose parent used its thread pool). ``None`` (auto) turns it on
    where that holds and at least two workers would run. Measured on the 2-core CPU
    (``benchmarks/THROUGHPUT.md``): EfficientNet-Lite0 171-174 img/s against 117-121 with the
    encoder in the main process (1,080 photos), ViT-B/32 39.1 against 35.3 (320 photos); one
    model with two threads ran 1.6x one with one thread, two single-threaded copies 2x.
    """
    on_cpu = str(device) == "cpu"
    if option is None:
        return on_cpu and not compile and fork_context() is not None and resolve_workers(workers, n_items, replicas=True) >= 2
    if not option:
        return False
    if not on_cpu:
        raise InputError(f"encoder replicas run on the CPU; this encoder runs on {device}")
    if workers == 0:
        raise InputError("encoder replicas run in the worker processes: --workers must be at least 1")
    if fork_context() is None:
        raise InputError("encoder replicas need worker processes started by fork (Linux)")
    if compile:
        raise InputError("--compile compiles the encoder in the main process: use it with --no-replicas")
    return True
