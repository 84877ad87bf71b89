"""The embedding stage on Ray: work units mapped through an actor pool of encoders.

The driver cuts the image list into units (:mod:`retrieval.embed.ray_units`), drops the
units whose output is already kept (a rerun), and hands the others to Ray Data, one unit
per block and per task: ``map_batches(UnitEncoder, batch_size=1)`` over an actor pool
(``num_gpus=1`` per actor when the cluster has GPUs, one CPU each otherwise). Each actor
loads the encoder once, decodes through our own decoder (a bad image is a failed row, never
a failed job) and writes its unit's output atomically; the driver then reads the units back
in the collection's order.

Storage (:mod:`retrieval.embed.unit_store`): the index's work folder (a path every node
sees), or ``RayOptions.work_dir``, a shared path or an fsspec URL; units read back from
there are kept in the index's work folder until the index is committed, then the job's
folder at the work location is removed.

Faults: an actor that dies (SIGKILL, out of memory, a lost node) is restarted by Ray
(``max_restarts=-1``) and its units are run again, up to ``RayOptions.unit_retries`` times
each (``max_task_retries``); a unit that raises a Python error is not retried: the build
stops at once with :class:`RayBuildError`, the units done are kept. A killed driver loses
nothing written: the same command again submits only the units with no valid output.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from retrieval.core.errors import InputError
from retrieval.embed import ray_hooks
from retrieval.embed.embedded import EmbeddedImages
from retrieval.embed.pipeline import EmbedOptions
from retrieval.embed.ray_cluster import (  # noqa: F401  (re-exported: the stage's public names)
    LOOPBACK,
    LOOPBACK_ENV,
    RayBuildError,
    RayOptions,
    ray_session,
)
from retrieval.embed.ray_units import (
    DEFAULT_UNIT_SIZE,
    Unit,
    assemble,
    cut_units,
    embed_unit,
    units_key,
)
from retrieval.embed.resume import Shard, WorkFolder
from retrieval.embed.unit_store import is_url, open_units
from retrieval.sources.items import ImageRef

# Ray Data settings of a build, set for its run and restored after: a Python error in a unit is
# not retried (neither as an actor task nor as a map task) and fails the job with its own error.
DATA_CONTEXT = {
    "actor_task_retry_on_errors": False,
    "retried_map_errors": False,
    "max_map_retries": 0,
    "max_errored_blocks": 0,
    "raise_original_map_exception": True,
}


class UnitEncoder:
    """A Ray Data callable class: embeds one unit per call and writes its output."""

    def __init__(
        self, encoders: Any, index: str, location: str | None, key: str, count: int, dim: int, batch_size: int
    ) -> None:
        from retrieval.encoders.registry import load_encoders

        self.encoder = load_encoders(encoders)[0]  # once per actor (again after a restart)
        self.units = open_units(location, index, key, count, dim)
        self.batch_size = batch_size
        self.written = 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        written = []
        for start, stop, refs in zip(batch["start"], batch["stop"], batch["refs"], strict=True):
            unit = Unit(int(start), int(stop))
            ray_hooks.before_unit(unit.start)
            shard = embed_unit(list(refs), unit, self.encoder, self.batch_size)
            self.units.write(shard)
            self.written += 1
            ray_hooks.after_unit(unit.start, self.written)
            written.append(len(shard.ok))
        return {"start": list(batch["start"]), "embedded": written}


def embed_images_on_ray(
    refs: Sequence[ImageRef],
    encoder: Any,
    options: EmbedOptions,
    work_dir: str | Path,
    ray_options: RayOptions,
) -> EmbeddedImages:
    """Embed ``refs`` on Ray into the work folder of the index ``work_dir`` (whose writer lock
    the caller holds) or ``ray_options.work_dir``; ``encoder`` is the driver's copy (the job's
    key, its dimension). ``resumed`` of the result counts the images of units done before."""
    if ray_options.encoders is None:
        raise InputError("a Ray build needs the encoder choice (RayOptions.encoders) to load on its actors")
    batch_size = options.resolved_batch_size(encoder.device)
    unit_size = ray_options.unit_size or options.resolved_progress_shard_size() or DEFAULT_UNIT_SIZE
    # loose-file units hold whole batches, so their batches are the single-machine build's
    units = cut_units(refs, -(-unit_size // batch_size) * batch_size)
    key = units_key(refs, encoder, batch_size, units)
    dim = int(encoder.dim)
    work = WorkFolder(work_dir, key, len(refs), dim)
    shared = open_units(ray_options.work_dir, work_dir, key, len(refs), dim) if ray_options.work_dir else None
    done = {(s.start, s.stop) for s in _done(work, shared)}
    todo = [u for u in units if (u.start, u.stop) not in done]
    resumed = sum(u.stop - u.start for u in units if (u.start, u.stop) in done)
    if resumed and options.progress:
        print(f"resuming: {len(units) - len(todo)} of {len(units)} units already embedded", file=sys.stderr, flush=True)
    actors = 0
    if todo:
        with ray_session(ray_options) as ray:
            job = (
                _absolute(work_dir) or str(work_dir),
                _absolute(ray_options.work_dir),
                key,
                len(refs),
                dim,
                batch_size,
            )
            actors = _run_units(ray, refs, todo, ray_options, job, options.progress)
    shards = {(s.start, s.stop): s for s in _done(work, shared)}
    kept = [shards[(u.start, u.stop)] for u in units if (u.start, u.stop) in shards]
    return assemble(refs, kept, dim, resumed=resumed, workers=actors)


def _absolute(location: str | Path | None) -> str | None:
    """A path as the actors must see it (absolute: their working folder is not ours); URLs as given."""
    if location is None or is_url(location):
        return None if location is None else str(location)
    return str(Path(location).resolve())


def _done(work: WorkFolder, shared: Any) -> list[Shard]:
    """The valid units of the job: the index's work folder's, and the shared location's, which
    are moved into the work folder (removed with it once the index is committed)."""
    if shared is None:
        return work.load()
    local = work.load()
    have = {(s.start, s.stop) for s in local}
    fetched = [s for s in shared.load() if (s.start, s.stop) not in have]
    for shard in fetched:
        work.write(shard)
    shared.remove()
    return sorted(local + fetched, key=lambda s: s.start)


@contextlib.contextmanager
def _data_context(ray: Any, progress: bool) -> Iterator[None]:
    """Ray Data's settings for one build (DATA_CONTEXT), the caller's restored after it."""
    context = ray.data.DataContext.get_current()
    settings = {**DATA_CONTEXT, "enable_progress_bars": progress}
    saved = {name: getattr(context, name) for name in settings}
    for name, value in settings.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)


def _run_units(
    ray: Any,
    refs: Sequence[ImageRef],
    todo: Sequence[Unit],
    ray_options: RayOptions,
    job: tuple[str, str | None, str, int, int, int],
    progress: bool,
) -> int:
    """Map the units through the actor pool; returns the number of actors."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    actors = min(ray_options.actors or (gpus if gpus else max(1, cpus - 1)), len(todo))
    items = [
        {"start": u.start, "stop": u.stop, "refs": list(refs[u.start : u.stop])} for u in todo
    ]  # Ray serialises them
    index, location = job[0], job[1]
    with _data_context(ray, progress):
        data = ray.data.from_items(items, override_num_blocks=len(items))  # one unit per block, so per task
        out = _map_units(ray, data, actors, gpus, ray_options, job)
        try:
            written = out.take_all()
        except Exception as e:  # a Python error in a unit fails the job at once (not retried: DATA_CONTEXT)
            raise RayBuildError(
                f"{location or index}: a work unit failed on Ray ({root_cause(e)}); the units done "
                "are kept: run the same command again to embed only the others"
            ) from e
    if len(written) != len(todo):
        raise RuntimeError(f"Ray returned {len(written)} of {len(todo)} units")
    return actors


def _map_units(
    ray: Any,
    data: Any,
    actors: int,
    gpus: int,
    ray_options: RayOptions,
    job: tuple[str, str | None, str, int, int, int],
) -> Any:
    """The units through a pool of ``actors`` UnitEncoders (one GPU each, or one CPU)."""
    index, location, key, count, dim, batch_size = job
    return data.map_batches(
        UnitEncoder,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
        num_cpus=0 if gpus else 1,
        # a dead actor: restarted, its units run again. Ray 2.60 takes these only as ray_remote_args: it
        # prints a RayDeprecationWarning once (removed in 2.64, with no named parameter for them yet)
        max_restarts=-1,
        max_task_retries=ray_options.unit_retries,
        fn_constructor_kwargs={
            "encoders": ray_options.encoders,
            "index": index,
            "location": location,
            "key": key,
            "count": count,
            "dim": dim,
            "batch_size": batch_size,
        },
    )


def root_cause(error: BaseException) -> str:
    """The original error inside Ray's wrappers, as ``Type: last line of its message``: the
    innermost error that says something (an actor that died in its constructor ends in an
    empty SystemException; the ActorDiedError above it names the constructor's error)."""
    seen, telling = set(), error
    while id(error) not in seen:
        seen.add(id(error))
        if str(error).strip():
            telling = error
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    lines = str(telling).strip().splitlines()
    return f"{type(telling).__name__}: {lines[-1] if lines else ''}"
