"""How the embedding stage uses the machine: how many DataLoader workers, and whether they encode.

On a GPU the main process encodes the batches the workers decode. On the CPU each worker can
also encode its own batches with a single-threaded copy of the encoder (a *replica*, shared
copy-on-write by fork): see :func:`use_replicas`.

Workers die with the build that started them (:class:`WorkerInit`): a worker that outlived a
build killed with SIGKILL would sleep forever (its exit waits on a queue nobody reads).

Every worker runs single-threaded (:func:`single_threaded`): N workers on N cores each with a
pool of N torch / OpenMP / BLAS threads fight over the cores instead of adding up
(``benchmarks/THROUGHPUT.md``, issue 17).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

from retrieval.core.errors import InputError

__all__ = [
    "MAX_AUTO_REPLICAS",
    "MAX_AUTO_WORKERS",
    "PAUSE_ENV",
    "SMALL_COLLECTION",
    "WorkerInit",
    "die_with_parent",
    "THREAD_ENV",
    "fork_context",
    "pause_for_tests",
    "resolve_workers",
    "single_threaded",
    "use_replicas",
]

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

    One per core, not one per spare core: workers sleep while the batch queue is full, so the
    extra worker costs the encoder nothing and keeps it fed (``benchmarks/THROUGHPUT.md``).
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
    where that holds and at least two workers would run: one model on several threads scales
    poorly and stalls whenever a decode worker takes one of its cores, while single-threaded
    copies run side by side (``benchmarks/THROUGHPUT.md``).
    """
    on_cpu = str(device) == "cpu"
    if option is None:
        return (
            on_cpu
            and not compile
            and fork_context() is not None
            and resolve_workers(workers, n_items, replicas=True) >= 2
        )
    if not option:
        return False
    if not on_cpu:
        raise InputError(f"encoder replicas run on the CPU; this encoder runs on {device}")
    if workers == 0:
        raise InputError("encoder replicas run in the worker processes: `EmbedOptions.workers` must be at least 1")
    if fork_context() is None:
        raise InputError("encoder replicas need worker processes started by fork (Linux)")
    if compile:
        raise InputError(
            "`EmbedOptions.compile` compiles the encoder in the main process: use it with `EmbedOptions.replicas=False`"
        )
    return True


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class WorkerInit:
    """The DataLoader ``worker_init_fn`` of the embedding stage: the worker dies with the process that
    made it, and runs every thread pool it has with one thread (:func:`single_threaded`).

    Made in the parent (it records the parent's pid); picklable, so it works with any start method.
    Nothing is changed in the parent: only the worker process, which is ours, is set up.
    """

    def __init__(self) -> None:
        self.parent = os.getpid()

    def __call__(self, worker_id: int) -> None:
        die_with_parent(self.parent)
        single_threaded()


# Thread-pool sizes read by libraries when they start their pools: OpenMP (torch, numpy's BLAS
# builds), MKL, OpenBLAS, Apple Accelerate, numexpr. Set in the worker before anything there
# starts one; pools already running are resized by the calls in single_threaded.
THREAD_ENV: Mapping[str, str] = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}


def single_threaded() -> dict[str, Any]:
    """Run this process's thread pools with one thread each; call only in a worker process.

    torch intra-op (``set_num_threads(1)``) and inter-op (``set_num_interop_threads(1)``, which
    torch allows only before the process's first inter-op work: refused otherwise, and then
    left as it is), the OpenMP / MKL / OpenBLAS environment for pools started later, the BLAS and
    OpenMP pools already loaded (threadpoolctl, where installed), and OpenCV's pool when cv2 is
    already imported (it is never imported here). Pillow needs nothing: its decoders and resize
    run on the calling thread. Returns what was set, for tests and benchmarks.
    """
    import torch

    os.environ.update(THREAD_ENV)
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # the inter-op pool already started (torch allows the call once, early)
        torch.set_num_interop_threads(1)
    limited = _limit_native_pools()
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and hasattr(cv2, "setNumThreads"):
        cv2.setNumThreads(1)
    return {
        "torch": torch.get_num_threads(),
        "interop": torch.get_num_interop_threads(),
        "native_pools": limited,
        "cv2": cv2 is not None,
    }


def _limit_native_pools() -> int:
    """Limit the BLAS / OpenMP pools loaded in this process to one thread (threadpoolctl); how many."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: the environment variables still cover pools started later
        return 0
    controller = ThreadpoolController()  # scans the loaded libraries once; limit() reuses that scan
    controller.limit(limits=1)  # the limit stays for the rest of this worker's life
    return len(controller.lib_controllers)


def die_with_parent(parent: int) -> bool:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``).

    Returns False where that is not available. If ``parent`` already died before the request
    (this process was re-parented and no signal will come), the process kills itself now.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # no libc to load, or no prctl in it
        return False
    if os.getppid() != parent and not _alive(parent):  # under forkserver the parent differs but lives
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


# Test hook, off by default: with RETRIEVAL_TEST_PAUSE_AFTER_BATCHES=N the embedding stage stops its
# own process (SIGSTOP) once, right after it has handled its N-th batch, so that a crash test can
# SIGKILL a build at a known point instead of after a guessed delay.
PAUSE_ENV = "RETRIEVAL_TEST_PAUSE_AFTER_BATCHES"
T = TypeVar("T")


def pause_for_tests(batches: Iterator[T]) -> Iterator[T]:
    """``batches`` unchanged, or, with :data:`PAUSE_ENV` set, an iterator that stops the process after N of them."""
    text = os.environ.get(PAUSE_ENV, "").strip()
    if not text:
        return batches
    if not text.isdigit() or int(text) < 1 or not hasattr(signal, "SIGSTOP"):
        raise InputError(f"{PAUSE_ENV} must be a whole number >= 1 (and needs SIGSTOP), got {text!r}")
    return _pausing(batches, int(text))


def _pausing(batches: Iterator[T], after: int) -> Iterator[T]:
    for count, batch in enumerate(batches, 1):
        yield batch
        if count == after:
            os.kill(os.getpid(), signal.SIGSTOP)
