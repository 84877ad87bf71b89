"""The embedding stage: decode and preprocess images in DataLoader workers, encode in batches.

On a GPU the main process encodes the batches the workers prepare. On the CPU each worker
also encodes its own batches with a single-threaded copy of the encoder (*replicas*, shared
copy-on-write by fork): the model's intra-op threads scale poorly and, sharing the cores
with decode workers, stall each other (see :func:`retrieval.embed.workers.use_replicas`).

With ``decode='gpu'`` (``auto`` on a CUDA encoder) the workers only read JPEGs and the main
process decodes them in batches on the GPU (:mod:`retrieval.embed.gpu_decode`).

Unreadable images are skipped and reported as :class:`ItemError` rows; they
never stop a build.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.core.errors import ImageDecodeError, InputError
from retrieval.embed.embedded import EmbeddedImages, ImageRow  # the stage's output (named here too)
from retrieval.embed.gpu_decode import (
    DECODE_CHOICES,
    DeviceDecoder,
    JpegBytesDataset,
    collate_jpegs,
    decode_device,
)
from retrieval.embed.workers import (
    WorkerInit,
    fork_context,
    pause_for_tests,
    resolve_workers,
    use_replicas,
)
from retrieval.sources.items import ImageRef, ItemError, load_image
from retrieval.sources.readahead import readahead

log = logging.getLogger(__name__)

# Default images per encoder batch. The CPU encoders slice batches themselves where smaller
# ones run faster (EfficientNet-Lite0), so 32 only sets how work is handed out; a GPU is kept
# busy only by large batches (its throughput by batch size: benchmarks/THROUGHPUT.md).
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
    # where JPEGs are decoded: 'cpu' (PIL in the workers), 'gpu' (in batches on the encoder's CUDA
    # device, other images on the CPU), 'auto' (gpu for a CUDA encoder where nvJPEG works)
    decode: str = "auto"

    def __post_init__(self) -> None:
        if self.decode not in DECODE_CHOICES:
            raise InputError(f"`EmbedOptions.decode` must be one of {', '.join(DECODE_CHOICES)}, got {self.decode!r}")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise InputError(f"`EmbedOptions.batch_size` must be a whole number >= 1, got {self.batch_size!r}")
        if self.workers != "auto" and (not isinstance(self.workers, int) or self.workers < 0):
            raise InputError(f"`EmbedOptions.workers` must be 'auto' or a whole number >= 0, got {self.workers!r}")
        if self.progress_shard_size is not None and (
            not isinstance(self.progress_shard_size, int) or self.progress_shard_size < 0
        ):
            raise InputError(
                f"`EmbedOptions.progress_shard_size` must be a whole number >= 0, got {self.progress_shard_size!r}"
            )

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


class _ImageDataset:
    """Map-style dataset: index -> (index, pixels or None, width, height, sha256, error reason)."""

    def __init__(
        self, refs: Sequence[ImageRef], transform: Callable[[Any], Any], draft_size: tuple[int, int] | None = None
    ) -> None:
        self.refs = list(refs)
        self.transform = transform
        self.draft_size = draft_size  # large JPEGs decode at reduced scale, never below this (part of a job's key)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitems__(self, positions: list[int]) -> list[tuple[int, Any, int, int, str, str | None]]:
        """A batch (the DataLoader's batched fetch): the OS is asked to read every image first,
        so later images come off the disk while earlier ones decode (:mod:`retrieval.sources.readahead`)."""
        readahead([self.refs[p] for p in positions])
        return [self[p] for p in positions]

    def __getitem__(self, position: int) -> tuple[int, Any, int, int, str, str | None]:
        ref = self.refs[position]
        try:  # a file through load_image; other items through the way they open their bytes
            loaded = (
                load_image(ref.path, draft_size=self.draft_size) if ref.path is not None else ref.load(self.draft_size)
            )
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
    """Embed ``refs`` with ``encoder`` (an ``ImageEncoder``), skipping and reporting unreadable items.

    With ``work_dir`` (an index directory, under its writer lock) the build is resumable:
    every ``options.progress_shard_size`` images go to a progress shard under
    ``work_dir/.work/<job key>/`` (written by a background thread), and the shards of an
    earlier, interrupted run of the same job are loaded instead of embedded again.
    See :mod:`retrieval.embed.resume`.
    """
    n = len(refs)
    dataset = _ImageDataset(refs, encoder.image_transform(), getattr(encoder, "draft_size", None))
    batch_size = options.resolved_batch_size(encoder.device)
    # decided by the whole job, not by what is left: a resumed run encodes its batches exactly
    # as the uninterrupted run would have (a replica's one thread and the main process's
    # several can differ in the last bit)
    replicas = use_replicas(options.replicas, encoder.device, options.workers, n, options.compile)
    # replicas encode in the workers, on the CPU: nothing decodes in the main process then
    on = None if replicas else decode_device(options.decode, encoder.device, dataset.transform)
    decoder = None if on is None else DeviceDecoder(dataset.transform, on, dataset.__getitem__)
    state = _Embedding(refs, int(encoder.dim))
    work = _work_folder(dataset, encoder, options, work_dir, batch_size, replicas, on)
    if work is not None:
        state.restore(work.load())
    resumed = int(state.done.sum())
    if resumed and options.progress:
        print(f"resuming: {resumed:,} of {n:,} images already embedded", file=sys.stderr, flush=True)
    todo = np.flatnonzero(~state.done)
    workers = resolve_workers(options.workers, n, replicas) if len(todo) else 0
    if replicas:
        encoder.prepare()  # anything built lazily is built once, here, and shared by the forks
    source = dataset if decoder is None else JpegBytesDataset(dataset)
    loader = make_loader(source, _batches(todo, batch_size), encoder, workers, replicas)
    compiling = encoder.compiled() if options.compile else contextlib.nullcontext()
    with compiling:  # torch.compile inside it, if asked for
        _run(loader if len(todo) else (), encoder, state, work, options, resumed, decoder)
    return state.result(
        resumed=resumed,
        workers=workers,
        replicas=replicas and workers > 0,
        decode_device=on,
        decoded_on_device=0 if decoder is None else decoder.on_device,
        **state.timing(),
    )


def make_loader(dataset: Any, batches: list[list[int]], encoder: Any, workers: int, replicas: bool) -> Any:
    """The DataLoader that decodes (and with ``replicas`` also encodes) the ``batches`` of ``dataset``
    (a :class:`~retrieval.embed.gpu_decode.JpegBytesDataset`: reads JPEGs for the batched decode)."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_EncodingCollate(encoder)
        if replicas
        else collate_jpegs
        if isinstance(dataset, JpegBytesDataset)
        else _collate,
        pin_memory=encoder.device == "cuda",
        prefetch_factor=(2 if replicas else 4) if workers else None,
        # only with worker processes: a resumed run with nothing left to embed starts none
        multiprocessing_context=fork_context() if replicas and workers else None,
        worker_init_fn=WorkerInit() if workers else None,  # workers die with this process
    )


def _work_folder(
    dataset: _ImageDataset,
    encoder: Any,
    options: EmbedOptions,
    work_dir: str | Path | None,
    batch_size: int,
    replicas: bool,
    decode: str | None,
) -> Any:
    """The progress shards of this job (None without a work dir, or for fewer images than a shard)."""
    from retrieval.embed.resume import WorkFolder, job_key

    shard_size = options.resolved_progress_shard_size() if work_dir is not None else 0
    if not shard_size or len(dataset) < shard_size:
        return None
    key = job_key(
        dataset.refs,
        encoder,
        batch_size,
        dataset.transform,
        dataset.draft_size,
        replicas=replicas,
        compile=options.compile,
        decode=decode,
    )
    return WorkFolder(work_dir, key, len(dataset), int(encoder.dim), shard_size)  # type: ignore[arg-type]


def _run(
    batches: Any,
    encoder: Any,
    state: _Embedding,
    work: Any,
    options: EmbedOptions,
    resumed: int,
    decoder: DeviceDecoder | None = None,
) -> None:
    """Encode every batch into ``state`` (its JPEGs decoded by ``decoder`` first), handing complete
    progress shards to ``work``."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=state.count,
        initial=resumed,
        desc="images",
        unit="img",
        file=sys.stderr,
        delay=1.0,
        disable=not options.progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    try:
        iterator = pause_for_tests(iter(batches))  # test hook, off by default
        if work is not None and not state.done.all():
            work.start()  # after the DataLoader forked its workers: no thread is copied into them
        for batch in iterator:
            state.take(batch if decoder is None else decoder.finish(batch), encoder)
            bar.update(len(batch["positions"]))
            if work is not None:
                state.track(batch, work)
        if work is not None:
            work.close()  # the last, partial run is not written: the commit follows at once
    except BaseException:
        if work is not None:
            work.abort()
        raise
    finally:
        bar.close()


class _Embedding:
    """What one embedding run has learnt so far: vectors, sizes and hashes, failures, the open shard."""

    def __init__(self, refs: Sequence[ImageRef], dim: int) -> None:
        self.refs = refs
        self.count = count = len(refs)
        self.vectors = np.zeros((count, dim), np.float32)
        self.done = np.zeros(count, bool)
        self.ok_meta: dict[int, tuple[int, int, str]] = {}
        self.failures: dict[int, str] = {}
        self.pending: Any = None  # the progress shard being filled
        self.started = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (time, images done) after the first batch
        self.last: tuple[float, int] = (self.started, 0)

    def restore(self, shards: Sequence[Any]) -> None:
        """Take the vectors and failures of an earlier run's complete shards."""
        for shard in shards:
            for row, (position, width, height, sha) in enumerate(shard.ok):
                self.vectors[position] = shard.vectors[row]
                self.ok_meta[position] = (width, height, sha)
            self.failures.update(shard.failed)
            self.done[shard.start : shard.stop] = True

    def take(self, batch: dict[str, Any], encoder: Any) -> None:
        """Record one batch: encode its pixels unless a worker already did."""
        encoded = batch.get("vectors")
        if encoded is None and batch["pixels"] is not None:
            encoded = encoder.encode_image_tensors(batch["pixels"])
        if encoded is not None:
            self.vectors[[position for position, _, _, _ in batch["ok"]]] = encoded
            for position, width, height, sha in batch["ok"]:
                self.ok_meta[position] = (int(width), int(height), sha)
        for position, reason in batch["failed"]:
            log.warning("skipped %s: %s", self.refs[position].location, reason)
            self.failures[position] = reason
        self.done[batch["positions"]] = True
        self.last = (time.perf_counter(), self.last[1] + len(batch["positions"]))
        if self.first is None:
            self.first = self.last

    def timing(self) -> dict[str, float]:
        """Start-up (to the first batch) apart from the steady state (every batch after it)."""
        if self.first is None:
            return {"startup_seconds": 0.0, "steady_images_per_second": 0.0}
        seconds, images = self.last[0] - self.first[0], self.last[1] - self.first[1]
        return {
            "startup_seconds": round(self.first[0] - self.started, 4),
            "steady_images_per_second": round(images / seconds, 2) if images and seconds > 0 else 0.0,
        }

    def track(self, batch: dict[str, Any], work: Any) -> None:
        """Add a batch to the open progress shard; submit the shard once full, or when a gap closes it."""
        from retrieval.embed.resume import Shard

        positions = batch["positions"]
        if self.pending is not None and positions[0] != self.pending.stop:
            self._submit(work)  # a gap left by a damaged shard is filled: close the run
        if self.pending is None:
            self.pending = Shard(start=positions[0], stop=positions[0])
        self.pending.stop = positions[-1] + 1
        self.pending.ok.extend((p, *self.ok_meta[p]) for p, _, _, _ in batch["ok"])
        self.pending.failed.extend(batch["failed"])
        if self.pending.stop - self.pending.start >= work.shard_size:
            self._submit(work)

    def _submit(self, work: Any) -> None:
        shard, self.pending = self.pending, None
        # the shard gets its own copy of its vectors (the writer thread reads them later)
        rows = [row[0] for row in shard.ok]
        shard.vectors = self.vectors[rows].copy() if rows else np.zeros((0, self.vectors.shape[1]), np.float32)
        work.submit(shard)

    def result(self, **stats: Any) -> EmbeddedImages:
        """Rows and vectors of the embedded images, in input order, and the skipped ones."""
        refs = self.refs
        rows = [ImageRow(refs[p], *self.ok_meta[p]) for p in sorted(self.ok_meta)]
        errors = [
            ItemError(path=refs[p].location, reason=self.failures[p], kind="image") for p in sorted(self.failures)
        ]
        keep = np.fromiter(sorted(self.ok_meta), dtype=np.int64, count=len(self.ok_meta))
        matrix = self.vectors[keep] if len(keep) != self.count else self.vectors
        return EmbeddedImages(rows=rows, vectors=matrix, errors=errors, **stats)
