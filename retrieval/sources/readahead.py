"""Ask the OS to start reading a batch of items before they are decoded (``posix_fadvise(WILLNEED)``).

An embedding worker decodes a batch's images one after another. Where the bytes are not in the
page cache (a collection larger than memory, a cold disk), each read waits for the disk while the
CPU idles. Announcing the whole batch first lets the kernel fetch the later images while the
earlier ones decode. For tar members one hint covers each shard's stretch of the batch (one open
per shard, where its members lie close together); loose files get one hint each. It is only a hint:
where ``posix_fadvise`` does not exist, or a file cannot be opened, nothing happens and the read
reports any problem later.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from retrieval.sources.items import ImageRef
from retrieval.sources.webdataset_tar import TarMember

_ADVISE: Callable[[int, int, int, int], None] | None = getattr(os, "posix_fadvise", None)
SLACK = 1 << 20  # bytes between a batch's members of one shard that one hint may cover for nothing


def readahead(refs: Iterable[ImageRef]) -> int:
    """Hint the kernel to read ``refs``' bytes soon; returns how many hints were given."""
    if _ADVISE is None:
        return 0
    members: dict[str, list[tuple[int, int]]] = {}  # shard -> (offset, size) of its members in this batch
    files: list[str] = []
    for ref in refs:
        opener = ref.opener
        if isinstance(opener, TarMember):
            members.setdefault(opener.path, []).append((opener.offset, opener.size))
        elif opener is None:
            files.append(str(ref.path))
    hints = [(path, offset, size) for path, found in members.items() for offset, size in member_spans(found)]
    return sum(_advise(*hint) for hint in hints) + sum(_advise(path, 0, 0) for path in files)


def member_spans(members: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """One (offset, size) over a shard's members when they lie close together (a batch is a run of
    consecutive samples: only their small captions and headers lie between), else one per member."""
    start = min(offset for offset, _ in members)
    end = max(offset + size for offset, size in members)
    wanted = sum(size for _, size in members)
    return [(start, end - start)] if end - start <= 2 * wanted + SLACK else members


def _advise(path: str, offset: int, length: int) -> bool:
    """``posix_fadvise(WILLNEED)`` on ``length`` bytes at ``offset`` (0: to the end) of ``path``."""
    if _ADVISE is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except (OSError, ValueError):  # gone, unreadable, a name with NUL: the read reports it
        return False
    try:
        _ADVISE(fd, offset, length, os.POSIX_FADV_WILLNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
