"""Connecting to Ray: the options of a Ray build, a local cluster on loopback, shipping our code.

``ray_session`` starts a one-machine cluster that listens on 127.0.0.1 only, or joins a running
cluster. A joined cluster's workers may not have ``retrieval`` installed, so the session ships
this package to them (``runtime_env={"py_modules": [<the retrieval package folder>]}``: Ray
zips it once per job and every worker imports it from there); ``ship_code=False`` turns that
off for clusters that install the package themselves. Third-party packages (torch, open_clip,
faiss, fsspec...) are the cluster's to install. Ray is imported only here, on demand.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.core.config import EncoderChoice
from retrieval.core.errors import InputError, RetrievalError

# Ray picks the node's external address unless told it runs on one machine; read at import
# (see ray._private.services.get_node_ip_address): with it, every Ray process of a local
# cluster listens on 127.0.0.1 only.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOOPBACK = "127.0.0.1"
SHIP_EXCLUDES = ["__pycache__", "*.pyc"]


class RayBuildError(RetrievalError):
    """A work unit failed on Ray with an error (not a lost worker, which Ray retries)."""


@dataclass(frozen=True)
class RayOptions:
    """How a build runs on Ray: ``address`` is ``local`` (start a one-machine cluster on
    127.0.0.1), ``auto`` (the running cluster, else a local one) or a cluster address;
    ``encoders`` are loaded once per actor; ``actors`` None: one per GPU, else CPUs - 1;
    ``unit_size``: loose files per unit (None: the build's progress shard size, else
    ``DEFAULT_UNIT_SIZE``; rounded up to whole batches); ``work_dir``: where the units are
    written (a path every node sees or an fsspec URL; None: the index's ``.work/`` folder);
    ``ship_code``: send this package to the workers of a joined cluster; ``unit_retries``:
    how often a unit whose worker died (SIGKILL, out of memory, a lost node) is run again."""

    address: str = "auto"
    encoders: EncoderChoice | None = None
    unit_size: int | None = None
    actors: int | None = None
    local_cpus: int | None = None  # logical CPUs of a local cluster (None: actors + 2, at least 4)
    work_dir: str | None = None
    ship_code: bool = True
    unit_retries: int = 3

    def __post_init__(self) -> None:
        if not self.address:
            raise InputError("`RayOptions.address` must be 'auto', 'local' or a cluster address")
        if self.actors is not None and self.actors < 1:
            raise InputError(f"Ray actors must be >= 1, got {self.actors}")
        if self.unit_retries < 0:
            raise InputError(f"Ray unit retries must be >= 0, got {self.unit_retries}")


def import_ray() -> Any:
    """The ``ray`` module, imported with the loopback setting; InputError when not installed."""
    if "ray" not in sys.modules:
        for name, value in LOOPBACK_ENV.items():
            os.environ.setdefault(name, value)  # must precede `import ray`; see LOOPBACK_ENV
    try:
        import ray
    except ImportError:
        raise InputError("`ray` needs Ray: pip install 'retrieval[ray]' (ray[data]==2.60.0)") from None
    return ray


def package_dir() -> Path:
    """The folder of the ``retrieval`` package this process runs (this module's grandparent)."""
    return Path(__file__).resolve().parents[1]


def runtime_env(options: RayOptions) -> dict[str, Any] | None:
    """The job's runtime environment on a joined cluster: this package for its workers (or None)."""
    if not options.ship_code:
        return None
    return {"py_modules": [str(package_dir())], "excludes": list(SHIP_EXCLUDES)}


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[Any]:
    """A connected Ray (the ``ray`` module): the caller's session if one is open (left open),
    else one started or joined here and shut down on exit."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if options.address in ("local", "auto"):
        joined = False
        if options.address == "auto":
            with contextlib.suppress(ConnectionError):
                ray.init(address="auto", runtime_env=runtime_env(options), **quiet)
                joined = True
        if not joined:
            cpus = options.local_cpus or max(4, (options.actors or 1) + 2)  # a spare CPU for the read task: ray#44687
            ray.init(num_cpus=cpus, _node_ip_address=LOOPBACK, **quiet)
    else:
        ray.init(address=options.address, runtime_env=runtime_env(options), **quiet)
    try:
        yield ray
    finally:
        ray.shutdown()
