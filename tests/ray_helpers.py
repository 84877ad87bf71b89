"""What the Ray test modules share: an alarm that fails a hung test, and one local Ray session per
module on 127.0.0.1, started the way ``--ray local`` starts one (``ray.init`` takes 4-6 s)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import COCO, require_shared_data
from hostile import time_limit

from retrieval.embed.ray_cluster import LOOPBACK_ENV, RayOptions, ray_session


def alarm_after(seconds: int) -> Any:
    """Fail the test (with every thread's traceback) when it runs over ``seconds``: a deadlocked actor
    pool or a driver that never got killed, instead of a hung suite."""
    return time_limit(seconds, "this Ray test", dump_threads=True)


def photos_with_a_broken_one(root: Path, count: int = 24) -> Path:
    """``count`` COCO photos copied into ``root`` as loose files, and one truncated JPEG."""
    require_shared_data()
    names = sorted(p.name for p in (COCO / "images").glob("*.jpg"))[:count]
    for name in names:
        shutil.copy(COCO / "images" / name, root / name)
    good = (root / names[0]).read_bytes()
    (root / "zz-broken.jpg").write_bytes(good[: len(good) // 3])
    return root


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
