"""The embedding stage on Ray: work units mapped through an actor pool of encoders.

The driver cuts the image list into units (:mod:`retrieval.embed.ray_units`), drops the
units whose output is already in the index's work folder (a rerun), and hands the others
to Ray Data, one unit per block and per task: ``map_batches(UnitEncoder, batch_size=1)``
over an actor pool (``num_gpus=1`` per actor when the cluster has GPUs, one CPU each
otherwise). Each actor loads the encoder once, decodes through our own decoder (a bad
image is a failed row, never a failed job) and writes its unit's shard atomically; the
driver then reads the shards back in the collection's order.

Storage: the work folder must be a path every node sees (one machine: any path).

Ray is imported only here, and only when a build asks for it (``retrieval[ray]``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from retrieval.core.config import EncoderChoice
from retrieval.core.errors import InputError, RetrievalError
from retrieval.embed.pipeline import EmbeddedImages, EmbedOptions
from retrieval.embed.ray_units import (
    DEFAULT_UNIT_SIZE,
    Unit,
    assemble,
    cut_units,
    embed_unit,
    units_key,
)
from retrieval.embed.resume import WorkFolder
from retrieval.sources.items import ImageRef

# Ray picks the node's external address unless told it runs on one machine; read at import
# (see ray._private.services.get_node_ip_address): with it, every Ray process of a local
# cluster listens on 127.0.0.1 only.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOOPBACK = "127.0.0.1"


class RayBuildError(RetrievalError):
    """A work unit failed on Ray with an error (not a lost worker, which Ray retries)."""


@dataclass(frozen=True)
class RayOptions:
    """How a build runs on Ray: ``address`` is ``local`` (start a one-machine cluster on
    127.0.0.1), ``auto`` (the running cluster, else a local one) or a cluster address;
    ``encoders`` are loaded once per actor; ``actors`` None: one per GPU, else CPUs - 1;
    ``unit_size``: loose files per unit (None: the build's progress shard size, else
    ``DEFAULT_UNIT_SIZE``; rounded up to whole batches)."""

    address: str = "auto"
    encoders: EncoderChoice | None = None
    unit_size: int | None = None
    actors: int | None = None
    local_cpus: int | None = None  # logical CPUs of a local cluster (None: actors + 2, at least 4)

    def __post_init__(self) -> None:
        if not self.address:
            raise InputError("--ray needs 'auto', 'local' or a cluster address")
        if self.actors is not None and self.actors < 1:
            raise InputError(f"Ray actors must be >= 1, got {self.actors}")


def _import_ray() -> Any:
    if "ray" not in sys.modules:
        for name, value in LOOPBACK_ENV.items():
            os.environ.setdefault(name, value)  # must precede `import ray`; see LOOPBACK_ENV
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'retrieval[ray]' (ray[data]==2.60.0)") from None
    return ray


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[Any]:
    """A connected Ray (the ``ray`` module): the caller's session if one is open (left open),
    else one started or joined here and shut down on exit."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if options.address in ("local", "auto"):
        joined = False
        if options.address == "auto":
            with contextlib.suppress(ConnectionError):
                ray.init(address="auto", **quiet)
                joined = True
        if not joined:
            cpus = options.local_cpus or max(4, (options.actors or 1) + 2)  # a spare CPU for the read task: ray#44687
            ray.init(num_cpus=cpus, _node_ip_address=LOOPBACK, **quiet)
    else:
        ray.init(address=options.address, **quiet)
    try:
        yield ray
    finally:
        ray.shutdown()


class UnitEncoder:
    """A Ray Data callable class: embeds one unit per call and writes its shard."""

    def __init__(self, encoders: EncoderChoice, index: str, key: str, count: int, dim: int, batch_size: int) -> None:
        from retrieval.encoders.registry import load_encoders

        self.encoder = load_encoders(encoders)[0]  # once per actor
        self.work = WorkFolder(index, key, count, dim)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        written = []
        for start, stop, refs in zip(batch["start"], batch["stop"], batch["refs"]):
            unit = Unit(int(start), int(stop))
            shard = embed_unit(list(refs), unit, self.encoder, self.batch_size)
            self.work.write(shard)
            written.append(len(shard.ok))
        return {"start": list(batch["start"]), "embedded": written}


def embed_images_on_ray(
    refs: Sequence[ImageRef], encoder: Any, options: EmbedOptions, work_dir: str | Path, ray_options: RayOptions,
) -> EmbeddedImages:
    """Embed ``refs`` on Ray into the work folder of the index ``work_dir`` (whose writer lock
    the caller holds); ``encoder`` is the driver's copy (the job's key, its dimension).
    ``resumed`` of the result counts the images of units done by an earlier run."""
    if ray_options.encoders is None:
        raise InputError("a Ray build needs the encoder choice (RayOptions.encoders) to load on its actors")
    batch_size = options.resolved_batch_size(encoder.device)
    unit_size = ray_options.unit_size or options.resolved_progress_shard_size() or DEFAULT_UNIT_SIZE
    # loose-file units hold whole batches, so their batches are the single-machine build's
    units = cut_units(refs, -(-unit_size // batch_size) * batch_size)
    key = units_key(refs, encoder, batch_size, units)
    dim = int(encoder.dim)
    work = WorkFolder(work_dir, key, len(refs), dim)
    done = {(s.start, s.stop) for s in work.load()}
    todo = [u for u in units if (u.start, u.stop) not in done]
    resumed = sum(u.stop - u.start for u in units if (u.start, u.stop) in done)
    if resumed and options.progress:
        print(f"resuming: {len(units) - len(todo)} of {len(units)} units already embedded", file=sys.stderr, flush=True)
    actors = 0
    if todo:
        with ray_session(ray_options) as ray:
            actors = _run_units(ray, refs, todo, ray_options, (str(work_dir), key, len(refs), dim, batch_size), options.progress)
    shards = [s for s in work.load() if any((s.start, s.stop) == (u.start, u.stop) for u in units)]
    return assemble(refs, shards, dim, resumed=resumed, workers=actors)


def _run_units(ray: Any, refs: Sequence[ImageRef], todo: Sequence[Unit], ray_options: RayOptions,
               job: tuple[str, str, int, int, int], progress: bool) -> int:
    """Map the units through the actor pool; returns the number of actors."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.raise_original_map_exception = True  # a unit's own error, not Ray Data's wrapper
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    actors = ray_options.actors or (gpus if gpus else max(1, cpus - 1))
    actors = min(actors, len(todo))
    items = [{"start": u.start, "stop": u.stop, "refs": list(refs[u.start : u.stop])} for u in todo]  # Ray serialises them
    index, key, count, dim, batch_size = job
    data = ray.data.from_items(items, override_num_blocks=len(items))  # one unit per block, so per task
    out = data.map_batches(
        UnitEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
        fn_constructor_kwargs={"encoders": ray_options.encoders, "index": index, "key": key, "count": count,
                               "dim": dim, "batch_size": batch_size},
    )
    try:
        written = out.take_all()
    except Exception as e:  # a Python error in a unit fails the job at once (Ray Data does not retry it)
        raise RayBuildError(f"{index}: a work unit failed on Ray ({_root_cause(e)}); the units done are kept: "
                            "run the same command again to embed only the others") from e
    if len(written) != len(todo):
        raise RuntimeError(f"Ray returned {len(written)} of {len(todo)} units")
    return actors


def _root_cause(error: BaseException) -> str:
    """The original error inside Ray's wrappers, as ``Type: message``."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"
