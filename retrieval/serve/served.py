"""The served indexes: one opened build each, switched atomically to a newer build when its manifest changes.

A request takes one :class:`Snapshot` at its start and uses only it, so it sees one build from start to
end. A change of ``manifest.json`` (a commit of ``build-index``, ``add`` or ``remove``) is noticed by a
request at most once per ``poll_s``; the new build is then opened and warmed on a background thread
while requests keep being answered from the old one, and becomes current by one reference assignment.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.api.engine import Index, open_index
from retrieval.api.lazy import OnceCache
from retrieval.store.layout import MANIFEST_NAME

log = logging.getLogger("retrieval.serve")
KINDS = ("image", "caption")


class Snapshot:
    """One build of one served index: the opened :class:`Index` and lookups between item ids and row positions."""

    def __init__(self, name: str, index: Index) -> None:
        self.name = name
        self.index = index
        self.build: str = index.manifest["build_id"]
        self.parts = OnceCache()

    def rows(self, kind: str) -> int:
        return self.index.rows(kind)

    def count(self, kind: str) -> int:
        return int(self.index.manifest["counts"][kind])

    def deleted(self, kind: str) -> frozenset[int]:
        return self.parts.get(("deleted", kind), lambda: frozenset(int(p) for p in self.index.deleted(kind)))

    def is_live(self, kind: str, position: int) -> bool:
        """Whether ``position`` names a stored, not deleted, ``kind`` item of this build."""
        return 0 <= position < self.rows(kind) and position not in self.deleted(kind)

    def position_of(self, kind: str, item_id: str) -> int:
        """The row position of the live item whose stored id is ``item_id``."""
        return self.parts.get(("positions", kind), lambda: self._positions(kind))[item_id]

    def _positions(self, kind: str) -> dict[str, int]:
        deleted = self.deleted(kind)
        return {item_id: pos for pos, item_id in enumerate(self.index.items(kind)["id"]) if pos not in deleted}

    def image_position(self, uri: str | None) -> int | None:
        """The live image row stored under ``uri`` (a caption's paired image), or None."""
        if not uri:
            return None
        table = self.parts.get("image-uris", lambda: {u: p for p, u in enumerate(self.index.items("image")["uri"])})
        position = table.get(uri)
        return position if position is not None and self.is_live("image", position) else None

    def vectors(self, kind: str, positions: np.ndarray) -> np.ndarray:
        """The stored (float16, as float32) vectors of ``kind`` items in their own encoder space, one row each."""
        key = f"{self.index.manifest['spaces'][kind]}/{kind}"
        return self.index.vector_source(key).take(np.asarray(positions, dtype=np.int64))


def warm(index: Index) -> None:
    """Load what queries need (items, encoders, vector indexes, ASIF parts) so no request pays for it."""
    for kind in KINDS:
        index.items(kind)
    _ = index.text_encoder, index.image_encoder
    for key in [*index.manifest["files"].get("faiss", {}), *index.manifest["files"].get("faiss_shards", {})]:
        index.vector_index(key)
    if index.mode == "asif":
        _ = index.anchor_spaces
        for kind in KINDS:
            if index.rows(kind):
                index.relative_index(kind)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path / MANIFEST_NAME)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ServedIndex:
    """One index directory served under a name: its current snapshot, replaced when a newer build is committed."""

    def __init__(
        self,
        name: str,
        path: Path,
        device: str = "auto",
        poll_s: float = 1.0,
        warm_up: bool = True,
        opener: Callable[[Path, str], Index] = open_index,
        freeze_gc: bool = False,
    ) -> None:
        self.name, self.path, self.device, self.poll_s, self.warm_up = name, Path(path), device, poll_s, warm_up
        self.opener, self.freeze_gc = opener, freeze_gc
        self.switches = 0
        self._lock = threading.Lock()  # guards the reload flag only; never held while a request searches
        self._loading = False
        self._checked = time.monotonic()
        self._seen = _signature(self.path)
        self._current = self._open()

    def _open(self) -> Snapshot:
        index = self.opener(self.path, self.device)
        if self.warm_up:
            warm(index)
        return Snapshot(self.name, index)

    def snapshot(self) -> Snapshot:
        """The current build (what a request uses from its start to its end); may start a switch to a newer one."""
        now = time.monotonic()
        if now - self._checked >= self.poll_s:
            self._checked = now
            self._maybe_reload()
        return self._current

    def _maybe_reload(self) -> None:
        signature = _signature(self.path)
        if signature is None or signature == self._seen:
            return
        with self._lock:
            if self._loading:
                return
            self._loading = True
        threading.Thread(target=self._reload, args=(signature,), name=f"reload-{self.name}", daemon=True).start()

    def _reload(self, signature: tuple[int, int, int]) -> None:
        try:
            fresh = self._open()
            if fresh.build != self._current.build:
                old, self._current = self._current, fresh  # one reference assignment: the switch
                self.switches += 1
                if (
                    self.freeze_gc
                ):  # the old build is freed by reference counting; the new one is kept from full collections
                    gc.freeze()
                log.info("index %s: now serving build %s (was %s)", self.name, fresh.build, old.build)
        except Exception as e:  # a damaged directory: keep serving the build we have, retry on its next change
            log.error("index %s: cannot open the new build, still serving %s: %s", self.name, self._current.build, e)
        finally:
            self._seen = signature
            with self._lock:
                self._loading = False

    def reload_now(self) -> Snapshot:
        """Open the directory's committed build now (blocking), make it current and return it."""
        self._reload(_signature(self.path) or (0, 0, 0))
        return self._current


class ServedIndexes:
    """The served indexes by name; the first is the default."""

    def __init__(
        self,
        entries: list[tuple[str, Path]],
        device: str = "auto",
        poll_s: float = 1.0,
        warm_up: bool = True,
        freeze_gc: bool = False,
        ray: str | None = None,
    ) -> None:
        """Open (and warm) each index; with ``freeze_gc``, then keep all that from the cyclic GC (see ServeConfig);
        with ``ray``, sharded indexes are searched by one Ray actor per shard."""
        opener = functools.partial(open_index, ray=ray) if ray else open_index
        self.by_name = {
            name: ServedIndex(name, path, device, poll_s, warm_up, opener, freeze_gc) for name, path in entries
        }
        self.default = entries[0][0]
        if freeze_gc:
            gc.freeze()

    def names(self) -> list[str]:
        return list(self.by_name)

    def get(self, name: str | None) -> ServedIndex | None:
        """The index called ``name`` (None or "" is the default); None when there is no such index."""
        return self.by_name.get(name or self.default) if isinstance(name, (str, type(None))) else None

    def builds(self) -> dict[str, Any]:
        return {name: served.snapshot().build for name, served in self.by_name.items()}
