"""The writer lock of an index or anchor directory: ``fcntl.flock`` on ``<dir>/.lock``.

One build at a time may write a directory. A second writer does not wait: it
fails at once with :class:`~retrieval.core.errors.IndexLockedError` naming the pid
of the build that holds the lock. Readers never take the lock; they rely on
the store's atomic manifest commit and on holding their files open (see
:mod:`retrieval.store`).

The lock is the kernel's, held by an open file description, so it disappears
with the process that holds it: a build killed with SIGKILL leaves at most a
stale ``.lock`` file (with a dead pid in it), never a stuck lock. On release
the lock file is unlinked while still locked; a process that opened the old
file just before sees, after it gets the lock, that the path no longer names
the file it locked, and starts over on the new one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from retrieval.core.errors import IndexLockedError, InputError

LOCK_NAME = ".lock"


class WriterLock:
    """An acquired writer lock; :meth:`release` (or leaving the ``with`` block) gives it back."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self._fd: int | None = None
        self._created_root = False
        self._acquire()

    def _acquire(self) -> None:
        try:
            mode = os.stat(self.root).st_mode
        except FileNotFoundError:  # one stat, not exists() + is_dir(): another writer may remove the folder in between
            mode = None
        if mode is not None and not stat.S_ISDIR(mode):
            raise InputError(f"{self.root}: exists and is not a directory")
        for _ in range(1000):  # retried only while a releasing writer removes the file (or folder) under us
            try:
                self.root.mkdir(parents=True)
                self._created_root = True
            except FileExistsError:
                pass
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                who = f"pid {holder}" if holder else "pid unknown"
                raise IndexLockedError(
                    f"{self.root}: index is locked by another build ({who}); "
                    "wait for it to finish, or build into another --index directory"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._fd = fd
            return
        raise IndexLockedError(f"{self.root}: could not take the writer lock ({self.path} keeps changing)")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlink the lock file, then unlock; remove the directory if this lock created it and it is empty."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)
        if self._created_root:
            try:
                self.root.rmdir()  # only succeeds when the build wrote nothing
            except OSError:
                pass

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # the kernel would release it anyway; be tidy
        try:
            self.release()
        except Exception:
            pass


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextmanager
def writer_lock(root: str | Path) -> Iterator[WriterLock]:
    """Hold the writer lock of ``root`` (created if missing) for the ``with`` block.

    Raises :class:`IndexLockedError` at once when another process holds it.
    """
    lock = WriterLock(root)
    try:
        yield lock
    finally:
        lock.release()

