"""Build ids and file digests: small helpers every stage that writes files shares."""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path


def new_build_id() -> str:
    """A sortable, unique id for one build: ``bYYYYMMDDTHHMMSS-xxxxxx``."""
    return time.strftime("b%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
