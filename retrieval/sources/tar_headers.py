"""A fast reader of tar headers: each member's name, type, data offset and size, nothing extracted.

Python's ``tarfile`` parses a header in ~60 us; scanning a shard before embedding it cost 10% of a
build of small shards (benchmarks/SHARDS.md). This reads the same ustar, GNU (``L``/``K`` long
names) and POSIX pax (``x`` records: ``path``, ``linkpath``, ``size``) headers with a few slices
and ``int`` calls, checks each header's checksum, and stops with :class:`TarDamage` (naming the
byte offset) at a damaged or truncated header. Headers are read through a window of the file
(one ``pread`` covers a member's pax header, its header and the small members that follow);
member data beyond the window is never read here.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
WINDOW = 1 << 14  # bytes read at once: a sample's small members and headers usually fit in one
ADLER_MOD = 65521
MAX_EXTENSION_BYTES = 1 << 20  # a pax record block or GNU long name larger than this is damage, not a name


class TarDamage(Exception):
    """A header that cannot be read; ``offset`` is where it starts."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"{reason} at byte {offset}")
        self.offset = offset
        self.reason = reason


class Member(NamedTuple):
    """One member: ``kind`` is "file", "dir", "symlink", "hardlink" or "other" (devices, fifos, sparse files)."""

    name: str
    kind: str
    offset: int  # where its data starts
    size: int
    linkname: str = ""


_EXTENSIONS = frozenset((b"x", b"g", b"L", b"K"))  # blocks that describe the next member
_KINDS = {b"0": "file", b"\0": "file", b"7": "file", b"5": "dir", b"2": "symlink", b"1": "hardlink"}


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(raw: bytes, offset: int) -> int:
    if raw[:1] and raw[0] & 0x80:  # GNU base-256 (sizes of 8 GiB and more)
        return int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
    digits = raw.rstrip(b"\0 ")  # the usual field: octal digits, then NULs and / or a space
    if digits.isdigit() and b"8" not in digits and b"9" not in digits:
        return int(digits, 8)
    digits = raw.split(b"\0", 1)[0].strip()  # the general rule: up to the first NUL, blanks around
    if digits.startswith(b"-"):
        raise TarDamage(offset, f"negative number {digits[:12]!r} in a header")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarDamage(offset, f"invalid number {digits[:12]!r} in a header") from None


def _checksum_ok(header: bytes, offset: int) -> bool:
    """The header's byte sum (its checksum field counted as spaces) against the stored one, modulo
    65521: zlib's Adler-32 sums the bytes in C (far faster than ``sum``), and a 512-byte header sums
    to at most 130,560, so a damaged header passes only if its sum moves by exactly 65,521."""
    stored = _number(header[148:156], offset)
    byte_sum = (zlib.adler32(header) & 0xFFFF) - 1 - sum(header[148:156]) + 8 * 32
    return (byte_sum - stored) % ADLER_MOD == 0


class FileWindow:
    """Reads of one file through a buffer of the bytes around the last read (``os.pread``: no seek)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.fd = handle.fileno()
        self.start = 0
        self.data = b""

    def read(self, pos: int, size: int) -> bytes:
        at = pos - self.start
        if at < 0 or at + size > len(self.data):
            self.data = os.pread(self.fd, max(size, WINDOW), pos)
            self.start, at = pos, 0
        return self.data[at : at + size]


def _pax(data: bytes, offset: int) -> dict[str, str]:
    """The ``key=value`` records of a pax extended header."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarDamage(offset, "invalid pax record") from None
        record = data[space + 1 : pos + length - 1]
        if (
            length <= 0 or b"=" not in record or data[pos + length - 1 : pos + length] != b"\n"
        ):  # each record ends its length with a newline
            raise TarDamage(offset, "invalid pax record")
        key, value = record.split(b"=", 1)
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _extension(window: FileWindow, type_flag: bytes, data: int, size: int, pos: int, pending: dict[str, str]) -> None:
    """Read a pax (``x``/``g``) or GNU long-name (``L``/``K``) block into ``pending``.

    pax records are parsed only when the block names a path or a size (the records this reader
    uses: ``path``, ``linkpath``, ``size``); webdataset's writers add one with just ``mtime`` to
    every member, whose parse would cost a dict and two decodes a member for nothing."""
    if size > MAX_EXTENSION_BYTES:
        raise TarDamage(pos, f"extended header of {size} bytes")
    payload = window.read(data, size)
    if len(payload) < size:
        raise TarDamage(pos, "truncated extended header")
    if type_flag == b"x":
        if b"path=" in payload or b"size=" in payload:
            pending.update(_pax(payload, pos))
    elif type_flag == b"L":
        pending["path"] = _text(payload)
    elif type_flag == b"K":
        pending["linkpath"] = _text(payload)


def _named(header: bytes, pending: dict[str, str], size: int, pos: int) -> tuple[str, str, int]:
    """A member header's (name, linkname, size), with the pax records or long names before it applied."""
    name = _text(header[0:100])
    if header[257:262] == b"ustar" and header[345:346] != b"\0":
        name = _text(header[345:500]) + "/" + name
    linkname = _text(header[157:257]) if header[156:157] in (b"1", b"2") else ""
    if pending:
        name = pending.get("path", name)
        linkname = pending.get("linkpath", linkname)
        if "size" in pending:
            if not pending["size"].isdigit():
                raise TarDamage(pos, f"invalid pax size {pending['size'][:20]!r}")
            size = int(pending["size"])
    return name, linkname, size


def iter_members(handle: BinaryIO, file_size: int, window: FileWindow | None = None) -> Iterator[Member]:
    """The members of the tar file open in ``handle`` (its position is not used), in order; stops at the end-of-archive
    block."""
    window = window or FileWindow(handle)
    read = window.read
    pos = 0
    pending: dict[str, str] = {}  # pax records / GNU long names for the next header
    while True:
        header = read(pos, BLOCK)
        if header == ZERO_BLOCK:
            return  # end-of-archive
        if len(header) < BLOCK:
            if not header.strip(b"\0") and pos + len(header) == file_size:
                return  # no end-of-archive blocks, which some writers omit
            raise TarDamage(pos, "truncated header")
        if not _checksum_ok(header, pos):
            raise TarDamage(pos, "invalid header (checksum mismatch)")
        type_flag = header[156:157]
        size = _number(header[124:136], pos)
        data = pos + BLOCK
        if type_flag in _EXTENSIONS:
            _extension(window, type_flag, data, size, pos, pending)
            pos = data + -(-size // BLOCK) * BLOCK
            continue
        name, linkname, size = _named(header, pending, size, pos)
        if pending:
            pending = {}
        kind = _KINDS.get(type_flag, "other")
        yield Member(name.rstrip("/") if kind == "dir" else name, kind, data, size, linkname)
        pos = data + (-(-size // BLOCK) * BLOCK if kind == "file" or kind == "other" else 0)
