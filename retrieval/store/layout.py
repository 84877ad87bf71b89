"""Names and constants of the index directory format (v1), and which top-level entries a build may leave behind."""

from __future__ import annotations

import os
import re
from pathlib import Path

from retrieval.embed.resume import (
    WORK_NAME,  # progress shards of a build in progress; never in a manifest
)

FORMAT_VERSION = 1


MANIFEST_NAME = "manifest.json"


ERRORS_NAME = "errors.jsonl"


LOCK_NAME = ".lock"


VECTOR_CHUNK_ROWS = 65_536  # rows converted and written at a time


MAX_MANIFEST_BYTES = 64 << 20


DATA_DIRS = ("items", "vectors", "faiss", "relative", "anchors")


BUILD_ID_PATTERN = re.compile(r"b[0-9]{8}T[0-9]{6}-[0-9a-f]{6}")


ROOT_TEMP_PATTERN = re.compile(r"^\.(manifest\.json|errors\.jsonl)\..+\.tmp$")


SAFE_PART_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


NUMPY_SUFFIXES = (".npy", ".npz")


OPEN_PATIENCE_S = 10.0  # an open restarts while commits keep landing under it, for at most this long


READ_CHUNK = 1 << 24


def is_leftover_name(name: str) -> bool:
    """True for an entry a killed or finished build may leave at the top of an index directory.

    ``.work`` holds the progress shards of a resumable build (:mod:`retrieval.embed.resume`);
    readers never look at it and :func:`remove_stale_files` leaves it alone.
    """
    return name in DATA_DIRS or name in (ERRORS_NAME, LOCK_NAME, WORK_NAME) or bool(ROOT_TEMP_PATTERN.match(name))


def directory_exists(root: str | Path) -> bool:
    """True when ``root`` holds a committed manifest."""
    return os.path.isfile(Path(root) / MANIFEST_NAME)
