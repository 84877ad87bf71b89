"""The embedding stage: decode and preprocess images in DataLoader workers, encode in batches.

On a GPU the main process encodes the batches the workers prepare. On the CPU each worker
also encodes its own batches with a single-threaded copy of the encoder (*replicas*, shared
copy-on-write by fork): the model's intra-op threads scale poorly and, sharing the cores
with decode workers, stall each other (see :func:`retrieval.embed.workers.use_replicas`).

Unreadable images are skipped and reported as :class:`ItemError` rows; they
never stop a build.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from retrieval.core.errors import ImageDecodeError, InputError
from retrieval.embed.workers import (
    WorkerInit,
    fork_context,
    pause_for_tests,
    resolve_workers,
    use_replicas,
)
from retrieval.sources.items import ImageRef, ItemError, load_image

log = logging.getLogger(__name__)

# Default images per encoder batch. The CPU encoders slice batches themselves where smaller
# ones run faster (EfficientNet-Lite0), so 32 only sets how work is handed out; a GPU wants
# large batches (the H200 ran ViT-B/32 at 20,444 img/s with 256, benchmarks/THROUGHPUT.md).
CPU_BATCH_SIZE = 32
CUDA_BATCH_SIZE = 256


@dataclass(frozen=True)
class EmbedOptions:
    """How the embedding stage runs."""

    batch_size: int | None = None  # None: CPU_BATCH_SIZE on the CPU, CUDA_BATCH_SIZE on a GPU
    workers: int | str = "auto"
    # CPU only: each worker also encodes its batches with a single-threaded copy of the encoder;
    # None decides by use_replicas (on for a CPU encoder with >= 2 workers where fork exists)
    replicas: bool | None = None
    # run the image model through torch.compile (for GPUs; the main process encodes: no replicas)
    compile: bool = False
    progress: bool = True
    # images per progress shard of a resumable build (see retrieval.embed.resume); None: the
    # RETRIEVAL_PROGRESS_SHARD_SIZE environment variable, else 4096; 0 turns progress shards off
    progress_shard_size: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise InputError(f"--batch-size must be a whole number >= 1, got {self.batch_size!r}")
        if self.workers != "auto" and (not isinstance(self.workers, int) or self.workers < 0):
            raise InputError(f"--workers must be 'auto' or a whole number >= 0, got {self.workers!r}")
        if self.progress_shard_size is not None and (
            not isinstance(self.progress_shard_size, int) or self.progress_shard_size < 0
        ):
            raise InputError(f"progress_shard_size must be a whole number >= 0, got {self.progress_shard_size!r}")

    def resolved_batch_size(self, device: str) -> int:
        """Images per encoder batch: the option, else the default for the device."""
        if self.batch_size is not None:
            return self.batch_size
        return CUDA_BATCH_SIZE if str(device).startswith("cuda") else CPU_BATCH_SIZE

    def resolved_progress_shard_size(self) -> int:
        """Images per progress shard: the option, else the environment variable, else the default."""
        from retrieval.embed.resume import (
            DEFAULT_PROGRESS_SHARD_SIZE,
            PROGRESS_SHARD_ENV,
        )

        if self.progress_shard_size is not None:
            return self.progress_shard_size
        text = os.environ.get(PROGRESS_SHARD_ENV, "").strip()
        if not text:
            return DEFAULT_PROGRESS_SHARD_SIZE
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise InputError(f"{PROGRESS_SHARD_ENV} must be a whole number >= 0, got {text!r}")
        return value


@dataclass
class ImageRow:
    """An image that was decoded and embedded, with what was learnt while decoding it."""

    ref: ImageRef
    width: int
    height: int
    sha256: str


@dataclass
class EmbeddedImages:
    """The result of embedding a list of images: rows and vectors aligned, plus the failures."""

    rows: list[ImageRow]
    vectors: np.ndarray
    errors: list[ItemError] = field(default_factory=list)
    resumed: int = 0  # images (embedded or skipped) taken from the progress shards of an earlier run
    workers: int = 0  # DataLoader worker processes this run started
    replicas: bool = False  # whether those workers encoded too (single-threaded encoder copies)


class _ImageDataset:
    """Map-style dataset: index -> (index, pixels or None, width, height, sha256, error reason)."""

    def __init__(self, refs: Sequence[ImageRef], transform: Callable[[Any], Any], draft_size: tuple[int, int] | None = None) -> None:
        self.paths = [ref.path for ref in refs]
        self.transform = transform
        self.draft_size = draft_size  # large JPEGs decode at reduced scale, never below this (part of a job's key)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, Any, int, int, str, str | None]:
        path = self.paths[position]
        try:
            loaded = load_image(path, draft_size=self.draft_size)
        except ImageDecodeError as e:
            return position, None, 0, 0, "", e.reason
        try:
            pixels = self.transform(loaded.image)
        except Exception as e:  # a transform failure must cost one image, not the build
            return position, None, 0, 0, "", f"preprocessing failed: {type(e).__name__}: {e}"
        return position, pixels, loaded.width, loaded.height, loaded.sha256, None


def _collate(samples: list[tuple[int, Any, int, int, str, str | None]]) -> dict[str, Any]:
    import torch

    good = [s for s in samples if s[1] is not None]
    return {
        "positions": [s[0] for s in samples],
        "pixels": torch.stack([s[1] for s in good]) if good else None,
        "ok": [(s[0], s[2], s[3], s[4]) for s in good],
        "failed": [(s[0], s[5]) for s in samples if s[1] is None],
    }


class _EncodingCollate:
    """Collate in a worker and encode there: the worker's batch leaves as vectors, not pixels."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder

    def __call__(self, samples: list[tuple[int, Any, int, int, str, str | None]]) -> dict[str, Any]:
        batch = _collate(samples)
        if batch["pixels"] is not None:
            batch["vectors"] = self.encoder.encode_image_tensors(batch["pixels"])
            batch["pixels"] = None
        return batch


def _batches(todo: np.ndarray, batch_size: int) -> list[list[int]]:
    """Position batches: each run of consecutive positions cut into ``batch_size`` pieces from its start.

    Runs start at 0 or at the end of a progress shard, which is always a batch boundary,
    so a resumed build forms exactly the batches an uninterrupted one would.
    """
    batches: list[list[int]] = []
    if not len(todo):
        return batches
    breaks = np.flatnonzero(np.diff(todo) != 1) + 1
    for run in np.split(todo, breaks):
        for start in range(0, len(run), batch_size):
            batches.append(run[start : start + batch_size].tolist())
    return batches


def embed_images(
    refs: Sequence[ImageRef], encoder: Any, options: EmbedOptions = EmbedOptions(), work_dir: str | Path | None = None
) -> EmbeddedImages:
    """Embed ``refs`` with ``encoder`` (an ``ImageEncoder``), skipping and reporting unreadable files.

    With ``work_dir`` (an index directory, under its writer lock) the build is resumable:
    every ``options.progress_shard_size`` images go to a progress shard under
    ``work_dir/.work/<job key>/`` (written by a background thread), and the shards of an
    earlier, interrupted run of the same job are loaded instead of embedded again.
    See :mod:`retrieval.embed.resume`.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from retrieval.embed.resume import Shard, WorkFolder, job_key

    n = len(refs)
    dim = int(encoder.dim)
    dataset = _ImageDataset(refs, encoder.image_transform(), getattr(encoder, "draft_size", None))
    vectors = np.zeros((n, dim), np.float32)
    done = np.zeros(n, bool)
    ok_meta: dict[int, tuple[int, int, str]] = {}
    failures: dict[int, str] = {}

    batch_size = options.resolved_batch_size(encoder.device)
    shard_size = options.resolved_progress_shard_size() if work_dir is not None else 0
    work: WorkFolder | None = None
    if shard_size and n >= shard_size:
        key = job_key(dataset.paths, encoder, batch_size, dataset.transform, dataset.draft_size)
        work = WorkFolder(work_dir, key, n, dim)
        for shard in work.load():
            for row, (position, width, height, sha) in enumerate(shard.ok):
                vectors[position] = shard.vectors[row]
                ok_meta[position] = (width, height, sha)
            failures.update(shard.failed)
            done[shard.start : shard.stop] = True
    resumed = int(done.sum())
    if resumed and options.progress:
        print(f"resuming: {resumed:,} of {n:,} images already embedded", file=sys.stderr, flush=True)

    todo = np.flatnonzero(~done)
    # decided by the whole job, not by what is left: a resumed run encodes its batches exactly
    # as the uninterrupted run would have (a replica's one thread and the main process's
    # several can differ in the last bit)
    replicas = use_replicas(options.replicas, encoder.device, options.workers, n, options.compile)
    workers = resolve_workers(options.workers, n, replicas) if len(todo) else 0
    if replicas:
        encoder.prepare()  # anything built lazily is built once, here, and shared by the forks
    loader = DataLoader(
        dataset,
        batch_sampler=_batches(todo, batch_size),
        num_workers=workers,
        collate_fn=_EncodingCollate(encoder) if replicas else _collate,
        pin_memory=encoder.device == "cuda",
        prefetch_factor=(2 if replicas else 4) if workers else None,
        multiprocessing_context=fork_context() if replicas else None,
        worker_init_fn=WorkerInit() if workers else None,  # workers die with this process
    )
    pending: Shard | None = None
    compiling = encoder.compiled() if options.compile else contextlib.nullcontext()
    bar = tqdm(total=n, initial=resumed, desc="images", unit="img", file=sys.stderr, delay=1.0,
               disable=not options.progress, dynamic_ncols=True, smoothing=0.1)
    with compiling:  # torch.compile inside it, if asked for
        try:
            batches = pause_for_tests(iter(loader)) if len(todo) else iter(())  # test hook, off by default
            if work is not None and len(todo):
                work.start()  # after the DataLoader forked its workers: no thread is copied into them
            for batch in batches:
                positions = batch["positions"]
                if work is not None and pending is not None and positions[0] != pending.stop:
                    _seal(pending, vectors)
                    work.submit(pending)  # a gap left by a damaged shard is filled: close the run
                    pending = None
                encoded = batch.get("vectors")
                if encoded is None and batch["pixels"] is not None:
                    encoded = encoder.encode_image_tensors(batch["pixels"])
                if encoded is not None:
                    good = [position for position, _, _, _ in batch["ok"]]
                    vectors[good] = encoded
                    for position, width, height, sha in batch["ok"]:
                        ok_meta[position] = (int(width), int(height), sha)
                for position, reason in batch["failed"]:
                    log.warning("skipped %s: %s", refs[position].path, reason)
                    failures[position] = reason
                done[positions] = True
                bar.update(len(positions))
                if work is not None:
                    if pending is None:
                        pending = Shard(start=positions[0], stop=positions[0])
                    pending.stop = positions[-1] + 1
                    pending.ok.extend((p, *ok_meta[p]) for p, _, _, _ in batch["ok"])
                    pending.failed.extend(batch["failed"])
                    if pending.stop - pending.start >= shard_size:
                        _seal(pending, vectors)
                        work.submit(pending)
                        pending = None
            if work is not None:
                work.close()  # the last, partial run is not written: the commit follows at once
        except BaseException:
            if work is not None:
                work.abort()
            raise
        finally:
            bar.close()

    rows = [ImageRow(refs[p], *ok_meta[p]) for p in sorted(ok_meta)]
    errors = [ItemError(path=str(refs[p].path), reason=failures[p], kind="image") for p in sorted(failures)]
    keep = np.fromiter(sorted(ok_meta), dtype=np.int64, count=len(ok_meta))
    matrix = vectors[keep] if len(keep) != n else vectors
    return EmbeddedImages(rows=rows, vectors=matrix, errors=errors, resumed=resumed, workers=workers, replicas=replicas and workers > 0)


def _seal(shard: Any, vectors: np.ndarray) -> None:
    """Give a shard its own copy of its vectors (the writer thread reads them later)."""
    shard.vectors = vectors[[row[0] for row in shard.ok]].copy() if shard.ok else np.zeros((0, vectors.shape[1]), np.float32)
