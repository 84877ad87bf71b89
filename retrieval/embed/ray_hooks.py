"""Test hooks of the Ray build's actors, off unless ``RETRIEVAL_TEST_RAY_HOOKS`` names a folder.

They make fault tests deterministic (``tests/test_ray_faults.py``); the actors inherit the
variable from the process that started the cluster. In that folder:

- ``kill-<start>``, holding a number N (empty: 1): the actor that picks up the unit starting at
  ``<start>`` counts N down (removing the file at 0) and SIGKILLs itself before embedding it,
  so the unit's first N tries die and the next one runs;
- ``embedded.log``: one line ``<start> <pid> <folder of the retrieval package>`` is appended per
  unit written (the folder shows where a cluster's worker took this code from);
- ``hold``: holding a number N, an actor that has written N units waits while the file exists
  (so a test can kill the driver in the middle of a job).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

HOOKS_ENV = "RETRIEVAL_TEST_RAY_HOOKS"


def _folder() -> Path | None:
    value = os.environ.get(HOOKS_ENV)
    return Path(value) if value else None


def before_unit(start: int) -> None:
    """Die here, once, when the test asked for it (``kill-<start>``)."""
    folder = _folder()
    if folder is None:
        return
    marker = folder / f"kill-{start}"
    try:
        left = int(marker.read_text().strip() or 1)
    except (FileNotFoundError, ValueError):
        return
    if left > 1:
        marker.write_text(str(left - 1))
    else:
        marker.unlink(missing_ok=True)
    os.kill(os.getpid(), signal.SIGKILL)


def after_unit(start: int, written: int) -> None:
    """Log the unit; then wait while ``hold`` exists if this actor has written ``hold``'s N units."""
    folder = _folder()
    if folder is None:
        return
    with open(folder / "embedded.log", "a", encoding="utf-8") as log:
        log.write(f"{start} {os.getpid()} {Path(__file__).resolve().parents[1]}\n")
    hold = folder / "hold"
    try:
        limit = int(hold.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return
    while written >= limit and hold.exists():
        time.sleep(0.05)
