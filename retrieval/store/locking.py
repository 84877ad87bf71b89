"""The writer lock of an index or anchor directory: ``fcntl.flock`` on ``<dir>/.lock``.

One build at a time may write a directory. A second writer does not wait: it
fails at once with :class:`~retrieval.core.errors.IndexLockedError` naming the pid
of the build that holds the lock. Readers never take the lock; they rely on
the store's atomic manifest commit and on holding their files open (see
:mod:`retrieval.store`).

The lock is the kernel's, held by an open file description, so it disappears
with the last process that holds that description: a build killed with SIGKILL
leaves at most a stale ``.lock`` file (with a dead pid in it), never a stuck
lock. A forked child (a DataLoader worker) would share the description and keep
the lock after its parent died, so every child closes its copy right after the
fork (:func:`_forget_in_child`, registered with :func:`os.register_at_fork`); the
descriptor is close-on-exec for ``exec``'d children. Should a lock still be held
only by processes that outlived the build that took it (children of an older
version, or of code that forks its own way), the error names them.

On release the lock file is unlinked while still locked; a process that opened
the old file just before sees, after it gets the lock, that the path no longer
names the file it locked, and starts over on the new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from retrieval.core.errors import IndexLockedError, InputError
from retrieval.store.writer import sync_errors_copy

LOCK_NAME = ".lock"

# the locks this process holds, so that a forked child can drop its copies (see _forget_in_child)
_HELD: weakref.WeakSet[WriterLock] = weakref.WeakSet()


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
                try:
                    message = _locked_message(self.root, fd)
                finally:
                    os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise IndexLockedError(message) from None
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
            _HELD.add(self)
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
        _HELD.discard(self)
        try:
            with suppress(FileNotFoundError):
                os.unlink(self.path)
        finally:
            os.close(fd)
        if self._created_root:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # only succeeds when the build wrote nothing

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # the kernel would release it anyway; be tidy
        with suppress(Exception):
            self.release()

    def abandon(self) -> None:
        """In a forked child: close this process's copy of the lock, leaving the parent's lock (and file) alone."""
        fd, self._fd = self._fd, None
        self._created_root = False
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # flock: the lock stays with the parent's descriptor of the same open file


def _forget_in_child() -> None:
    """Registered with os.register_at_fork: a forked child must not hold (or release) its parent's locks."""
    for lock in list(_HELD):
        lock.abandon()
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _locked_message(root: Path, fd: int) -> str:
    """Why the lock on ``fd`` is busy: the build that holds it, or the leftover processes of one that died."""
    build = _read_pid(fd)
    holders = lock_holders(fd)
    if holders and build is not None and build not in holders:
        pids = ", ".join(str(pid) for pid in holders)
        return (
            f"{root}: index is locked by leftover worker processes {pids} of a build (pid {build}) that died; "
            "kill them or wait for them to exit"
        )
    who = f"pid {build}" if build else "pid unknown"
    return (
        f"{root}: index is locked by another build ({who}); "
        "wait for it to finish, or build into another `index` directory"
    )


def lock_holders(fd: int) -> list[int]:
    """Pids of the other processes holding a flock on the file open at ``fd`` (Linux ``/proc``; else empty).

    A holder has a descriptor of that file whose ``/proc/PID/fdinfo`` lists a lock; processes
    that only opened it (a writer about to fail, like this one) hold none.
    """
    target = os.fstat(fd)
    proc = Path("/proc")
    holders = set()
    try:
        pids = [entry.name for entry in os.scandir(proc) if entry.name.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(proc / pid / "fd")
        except OSError:  # gone, or another user's
            continue
        for name in fds:
            try:
                found = os.stat(proc / pid / "fd" / name)
                if (found.st_dev, found.st_ino) != (target.st_dev, target.st_ino):
                    continue
                info = (proc / pid / "fdinfo" / name).read_text()
            except OSError:
                continue
            if any(line.startswith("lock:") and "FLOCK" in line for line in info.splitlines()):
                holders.add(int(pid))
    return sorted(holders)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextmanager
def writer_lock(root: str | Path) -> Iterator[WriterLock]:
    """Hold the writer lock of ``root`` (created if missing) for the ``with`` block.

    Raises :class:`IndexLockedError` at once when another process holds it. Once it is taken,
    a top-level ``errors.jsonl`` left stale by a writer killed right after its commit is put right.
    """
    lock = WriterLock(root)
    try:
        sync_errors_copy(root)
        yield lock
    finally:
        lock.release()
