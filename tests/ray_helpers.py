"""What the Ray test modules share: an alarm that fails a hung test, and one local Ray session per
module on 127.0.0.1, started the way ``--ray local`` starts one (``ray.init`` takes 4-6 s)."""

from __future__ import annotations

import faulthandler
import signal
from contextlib import contextmanager
from typing import Any, Iterator

import pytest

from retrieval.embed.ray_cluster import LOOPBACK_ENV, RayOptions, ray_session


@contextmanager
def alarm_after(seconds: int) -> Iterator[None]:
    """Fail the test (with every thread's traceback) when it runs over ``seconds``: a deadlocked actor
    pool or a driver that never got killed, instead of a hung suite."""
    def expired(signum: int, frame: Any) -> None:
        faulthandler.dump_traceback(all_threads=True)
        raise TimeoutError(f"Ray test ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def local_ray(env: dict[str, str] | None = None) -> Iterator[Any]:
    """A local Ray session (4 logical CPUs) with ``env`` set for its processes; the loopback setting that
    ``ray_session`` applies is removed again afterwards, and the session is shut down."""
    with pytest.MonkeyPatch.context() as patch:
        for name in LOOPBACK_ENV:
            patch.delenv(name, raising=False)  # set by ray_session, restored (removed) after the module
        for name, value in (env or {}).items():
            patch.setenv(name, value)  # inherited by the raylet, so by every actor
        with ray_session(RayOptions(address="local", local_cpus=4)) as ray:
            yield ray
        assert not ray.is_initialized()
