"""webdataset tar shards (img2dataset's ``webdataset`` output) as items, never extracted.

A shard is scanned once, header by header (:mod:`retrieval.sources.tar_headers` seeks past
member data): each sample ``{key}.jpg|png|webp`` with ``{key}.txt`` (its caption) and ``{key}.json`` (img2dataset's url,
key, caption, width, height, sha256, ...) becomes an image item with uri ``<shard>#<key>`` whose
opener reads the member's bytes by offset and size (:class:`TarMember`: cheap, picklable, no tar
held open or in memory), plus a caption item paired with it. Only the small ``.txt``/``.json``
members are read during the scan. Unsafe members (``..`` or absolute names, links, devices),
duplicate keys, samples without an image or a caption, damaged or truncated shards are reported
as :class:`ItemError` rows naming the shard and member; the rest of the shard is kept.

Items come shard by shard, in member order. The embedding stage cuts runs of consecutive items
into batches and hands them to its DataLoader workers in turn, so each batch reads one stretch
of one shard (two at a shard boundary) front to back, and a resumed build's progress shards
(keyed by each item's uri and version: shard size, mtime, member offset and size) cover whole
stretches of tar shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.sources.items import IMAGE_EXTENSIONS, CaptionRecord, ImageRef, ItemError
from retrieval.sources.tar_headers import FileWindow, Member, TarDamage, iter_members

MAX_SIDECAR_BYTES = 1 << 20  # a .txt/.json member larger than this is not a caption or metadata


@dataclass(frozen=True)
class TarMember:
    """Opener of one tar member: reads ``size`` bytes at ``offset`` of the shard file."""

    path: str
    offset: int
    size: int

    def __call__(self) -> bytes:
        fd = os.open(self.path, os.O_RDONLY)  # pread: no buffered file object, no seek
        try:
            data = os.pread(fd, self.size, self.offset)
            while 0 < len(data) < self.size:  # a read may stop short (Linux caps one at ~2 GiB)
                more = os.pread(fd, self.size - len(data), self.offset + len(data))
                if not more:
                    break
                data += more
        finally:
            os.close(fd)
        if len(data) != self.size:
            raise OSError(f"member data cut short: {len(data)} of {self.size} bytes (truncated shard?)")
        return data


@dataclass
class ShardItems:
    """What one shard (or one source argument) yields."""

    images: list[ImageRef] = field(default_factory=list)
    captions: list[CaptionRecord] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)

    def extend(self, other: ShardItems) -> None:
        self.images.extend(other.images)
        self.captions.extend(other.captions)
        self.errors.extend(other.errors)


def split_key(name: str) -> tuple[str, str]:
    """webdataset's split of a member name: (key = folder + name up to its first dot, extension)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _unsafe(member: Member) -> str | None:
    """Why a member must not be read (None: a plain, safely named file, or a folder)."""
    if member.kind in ("symlink", "hardlink"):
        return f"a link (to {member.linkname!r}); links are never followed"
    if member.kind == "other":
        return "not a regular file"
    if member.kind == "dir":
        return None
    if member.name.startswith("/") or ".." in member.name.split("/"):
        return "an absolute name or one with '..'; never extracted or read"
    try:
        member.name.encode("utf-8")
    except UnicodeEncodeError:
        return "a name that is not valid UTF-8"
    return None


class _Scan:
    """The members of one shard, grouped by sample key in order of appearance."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.samples: dict[str, dict[str, Member]] = {}
        self.sidecars: dict[tuple[str, str], bytes] = {}
        self.errors: list[ItemError] = []
        self.stat: os.stat_result | None = None  # of the open shard

    def error(self, reason: str, kind: str = "image", row: int | None = None) -> None:
        self.errors.append(ItemError(path=str(self.path), reason=reason, kind=kind, row=row))

    def run(self) -> None:
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 - closed by the `with` below; a failed open is reported apart
        except OSError as e:
            self.error(f"cannot open ({e.strerror or e}); shard skipped")
            return
        with handle:
            self.stat = os.fstat(handle.fileno())
            window = FileWindow(handle)
            try:
                for member in iter_members(handle, self.stat.st_size, window):
                    self.member(window, member, self.stat.st_size)
            except TarDamage as e:
                if e.offset == 0:
                    self.error(f"not a readable tar file ({e}); shard skipped")
                else:
                    self.error(f"damaged or truncated: {e}; the members after it are not read")

    def member(self, window: FileWindow, member: Member, size: int) -> None:
        unsafe = _unsafe(member)
        if unsafe:
            self.error(f"member {member.name!r} is {unsafe}; skipped")
            return
        if member.kind != "file":
            return
        if member.offset + member.size > size:
            self.error(f"member {member.name!r}: data ends past the end of the file (truncated shard); skipped")
            return
        key, ext = split_key(member.name)
        sample = self.samples.setdefault(key, {})
        if ext in sample:
            self.error(f"member {member.name!r}: duplicate key {key!r} (a second .{ext}); skipped")
            return
        sample[ext] = member
        if ext in ("txt", "json"):
            if member.size > MAX_SIDECAR_BYTES:
                self.error(
                    f"member {member.name!r}: {member.size} bytes, too large for a caption or metadata; skipped",
                    "caption",
                )
                return
            self.sidecars[(key, ext)] = window.read(member.offset, member.size)


def _image_ext(scan: _Scan, key: str, sample: dict[str, Member], row: int) -> str | None:
    """The sample's image extension (the first one; any other image member is reported)."""
    found = [ext for ext in sample if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
    for extra in found[1:]:
        scan.error(
            f"member {sample[extra].name!r}: sample {key!r} already has an image (.{found[0]}); skipped", "image", row
        )
    return found[0] if found else None


def _metadata(scan: _Scan, key: str, member: str, row: int) -> dict[str, Any]:
    raw = scan.sidecars.get((key, "json"))
    if raw is None:
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        scan.error(f"member {member!r}: invalid JSON metadata ({e}); kept without it", "image", row)
        return {}
    if not isinstance(value, dict):
        scan.error(
            f"member {member!r}: metadata is a JSON {type(value).__name__}, not an object; kept without it",
            "image",
            row,
        )
        return {}
    return value


def _caption(scan: _Scan, key: str, metadata: dict[str, Any], row: int) -> str | None:
    raw = scan.sidecars.get((key, "txt"))
    text: object = metadata.get("caption") if raw is None else None
    if raw is not None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            scan.error(f"sample {key!r}: caption is not UTF-8 (byte {e.start}); image kept without it", "caption", row)
            return None
    if not isinstance(text, str) or not text.strip():
        scan.error(f"sample {key!r}: no caption (.txt or json 'caption'); image kept without it", "caption", row)
        return None
    return text.strip()


def read_tar_shard(path: str | Path, source: str = "", resolved: bool = False) -> ShardItems:
    """The items of one webdataset tar shard (see the module docstring); problems are in ``errors``.
    ``resolved``: ``path`` is already absolute with no links (as :func:`container_files` gives them)."""
    shard = Path(path) if resolved else Path(path).resolve()
    scan = _Scan(shard)
    scan.run()
    stat = scan.stat or os.stat(shard)
    out = ShardItems(errors=scan.errors)
    for row, (key, sample) in enumerate(scan.samples.items(), start=1):
        ext = _image_ext(scan, key, sample, row)
        if ext is None:
            if sample:
                kind = "caption" if "txt" in sample else "image"
                scan.error(
                    f"sample {key!r} has no image member ({', '.join('.' + e for e in sample)}); skipped", kind, row
                )
            continue
        info = sample[ext]
        metadata = _metadata(scan, key, info.name, row)
        uri = f"{shard}#{key}"
        version = f"{stat.st_size}:{stat.st_mtime_ns}:{info.offset}:{info.size}"
        out.images.append(
            ImageRef(
                source=source or str(shard),
                uri=uri,
                version=version,
                metadata=metadata,
                opener=TarMember(str(shard), info.offset, info.size),
            )
        )
        text = _caption(scan, key, metadata, row)
        if text is not None:
            out.captions.append(CaptionRecord(text=text, source=str(shard), row=row, image=uri, metadata=metadata))
    return out
