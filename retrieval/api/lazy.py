"""Thread-safe lazy values: computed once per key, however many threads ask for them at the same time."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class OnceCache:
    """Values computed on first use, once per key, shared by every thread.

    The first caller of a key computes it while later callers of that key wait
    for the result; other keys are neither blocked nor recomputed. A computation
    that raises caches nothing, so the next caller tries again.
    """

    def __init__(self) -> None:
        self._values: dict[Hashable, Any] = {}
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()

    def pop(self, key: Hashable) -> Any:
        """Forget ``key`` and return its value (None when it was never computed)."""
        with self._guard:
            return self._values.pop(key, None)

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The value of ``key``, from ``compute()`` the first time it is asked for."""
        try:
            value: T = self._values[key]  # the common case: no lock once a value is there
            return value
        except KeyError:
            pass
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._values:
                self._values[key] = compute()
            value = self._values[key]
            return value


class Serialised:
    """A lock per object (by identity): calls into one object that is not thread-safe run one at a time."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[Any, threading.Lock]] = {}
        self._guard = threading.Lock()

    @contextmanager
    def using(self, thing: Any) -> Iterator[Any]:
        """Hold ``thing``'s lock for the block; yields ``thing``."""
        with self._guard:
            entry = self._locks.setdefault(id(thing), (thing, threading.Lock()))  # keeps ``thing``: its id stays unique
        with entry[1]:
            yield thing
