"""Naming many container files at once: brace ranges (``shards/{00000..00127}.tar``), brace lists
(``{a,b}.tar``) and globs, as webdataset and img2dataset users write them."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from retrieval.core.errors import InputError

CONTAINER_SUFFIXES: tuple[str, ...] = (".tar", ".parquet")
"""Files that hold many items: webdataset tar shards and parquet files with image bytes."""

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
MAX_EXPANSION = 1_000_000  # names one argument may expand to (a typo such as {0..99999999} fails fast)


def expand_braces(text: str) -> list[str]:
    """All names of ``text`` with each ``{A..B}`` (zero padding kept) or ``{x,y}`` expanded, in order."""
    match = _BRACE.search(text)
    if match is None:
        return [text]
    head, body, tail = text[: match.start()], match.group(1), text[match.end() :]
    numbers = _RANGE.match(body)
    if numbers:
        first, last = numbers.group(1), numbers.group(2)
        lo, hi = int(first), int(last)
        if abs(hi - lo) + 1 > MAX_EXPANSION:
            raise InputError(f"{text}: the range {{{body}}} names more than {MAX_EXPANSION:,} files")
        width = len(first) if first.lstrip("-").startswith("0") and len(first) > 1 else 0
        step = 1 if hi >= lo else -1
        choices = [str(n).zfill(width) for n in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # a literal brace pair: leave it, expand the rest
        return [head + "{" + body + "}" + name for name in expand_braces(tail)]
    out: list[str] = []
    for choice in choices:
        out.extend(expand_braces(head + choice + tail))
        if len(out) > MAX_EXPANSION:
            raise InputError(f"{text}: names more than {MAX_EXPANSION:,} files")
    return out


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def is_container(path: str | Path) -> bool:
    """Whether a file name is a tar shard or a parquet file."""
    return str(path).lower().endswith(CONTAINER_SUFFIXES)


def container_files(arg: str | Path) -> list[Path] | None:
    """The tar/parquet files an ``--images`` argument names, or None when it names something else
    (image files, a folder of images). A folder with no images but ``*.tar``/``*.parquet`` files
    names those. Missing shards of a brace range are an InputError naming them."""
    text = os.path.expanduser(str(arg))
    path = Path(text)
    if path.is_dir():
        return _folder_containers(path)
    names = expand_braces(text)
    if not any(is_container(name) for name in names):
        return None
    found: list[Path] = []
    missing: list[str] = []
    for name in names:
        if _has_glob(name):
            matches = sorted(m for m in glob.glob(name, recursive=True) if is_container(m) and Path(m).is_file())
            if not matches:
                missing.append(name)
            found.extend(Path(m) for m in matches)
        elif Path(name).is_file():
            found.append(Path(name))
        else:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InputError(f"{arg}: no such shard file: {shown}")
    if not all(is_container(p) for p in found):
        raise InputError(f"{arg}: mixes tar/parquet shards with other files; name them in separate `images` entries")
    return list(dict.fromkeys(p.resolve() for p in found))


def _folder_containers(folder: Path) -> list[Path] | None:
    """The shard files directly in ``folder`` when it holds no image files at all, else None:
    its tar shards if any, else its parquet files."""
    from retrieval.sources.items import IMAGE_EXTENSIONS

    has_images = any(
        os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS for _, _, files in os.walk(folder) for name in files
    )
    if has_images:
        return None
    real = folder.resolve()
    with os.scandir(
        folder
    ) as entries:  # a plain entry of the resolved folder is its own real path: one resolve, not one a shard
        files = sorted(
            Path(entry.path).resolve() if entry.is_symlink() else real / entry.name
            for entry in entries
            if is_container(entry.name) and not entry.name.startswith(".") and entry.is_file()
        )
    tars = [p for p in files if p.name.lower().endswith(".tar")]
    return (tars or files) or None  # img2dataset writes a metadata parquet (no image bytes) next to each tar
