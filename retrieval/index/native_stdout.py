"""FAISS prints some notices with C's ``printf`` (merging lists on disk: "resizing ..."; reading an
index whose lists moved: "IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename ..."). On a process's
standard output they would corrupt ``--json`` results, so the calls that print are wrapped here:
file descriptor 1 points at standard error while they run, and C's buffers are flushed before it
is put back. The swap is process-wide, so it is serialised and kept to those calls only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_SWAP = threading.Lock()


def _flush_c_streams() -> None:
    # no C library to reach (OSError, AttributeError): nothing buffered there that we could flush
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)  # every C stdio stream (FAISS's printf buffers into stdout's)


@contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Inside the block, what native code writes to standard output goes to standard error."""
    with _SWAP:
        sys.stdout.flush()
        _flush_c_streams()
        saved = os.dup(1)
        try:
            os.dup2(2, 1)
            yield
        finally:
            _flush_c_streams()
            os.dup2(saved, 1)
            os.close(saved)
