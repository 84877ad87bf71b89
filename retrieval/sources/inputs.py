"""What an ``--images`` argument names, read into items: image files and folders (with
img2dataset's ``files`` sidecars), webdataset tar shards, parquet files with image bytes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from retrieval.core.errors import InputError
from retrieval.sources.discovery import discover_images
from retrieval.sources.img2dataset_files import with_sidecars
from retrieval.sources.parquet_images import read_parquet_images
from retrieval.sources.scan_pool import read_in_order
from retrieval.sources.shards import container_files, is_container
from retrieval.sources.webdataset_tar import ShardItems, read_tar_shard

PROGRESS_DELAY = 1.0  # seconds a scan runs before its progress bar shows (short scans print nothing)


def read_containers(
    arg: str | Path,
    files: Sequence[Path],
    caption_column: str = "caption",
    image_column: str = "image",
    progress: bool = False,
) -> ShardItems:
    """The items of the tar/parquet ``files`` one argument named (resolved paths, as
    :func:`container_files` gives them), shard by shard in order (several read at once where the
    reads wait for storage: :mod:`retrieval.sources.scan_pool`); InputError when none has an image.
    ``progress``: a bar on stderr (shards, and the images found) for a scan that takes a while."""

    def read(path: Path) -> ShardItems:
        if path.name.lower().endswith(".tar"):
            return read_tar_shard(path, str(arg), resolved=True)
        return read_parquet_images(path, caption_column, image_column, str(arg))

    got = ShardItems()
    with tqdm(
        total=len(files),
        desc="scanning shards",
        unit="shard",
        file=sys.stderr,
        delay=PROGRESS_DELAY,
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for part in read_in_order(files, read):
            got.extend(part)
            bar.update(1)
            bar.set_postfix(images=len(got.images), refresh=False)
    if not got.images:
        first = f"; first problem: {got.errors[0].path}: {got.errors[0].reason}" if got.errors else ""
        raise InputError(f"{arg}: no images in {len(files)} shard file(s){first}")
    return got


def read_image_sources(
    args: Sequence[str | Path], caption_column: str = "caption", image_column: str = "image", progress: bool = False
) -> ShardItems:
    """Items of every ``--images`` argument in order, de-duplicated by location (first kept);
    ``progress``: a bar on stderr while many shards are scanned.

    Shard and parquet items come shard by shard, in the order the argument names the files
    (so the embedding stage's contiguous batches read each shard sequentially).
    """
    if isinstance(args, (str, Path)):
        args = [args]
    out = ShardItems()
    for arg in args:
        files = container_files(arg)
        if files is not None:
            out.extend(read_containers(arg, files, caption_column, image_column, progress))
            continue
        refs, skipped = discover_images([arg])
        out.extend(with_sidecars(refs))
        out.errors.extend(skipped)
    if len(args) > 1:  # one argument never names an item twice (discovery and shard lists are de-duplicated)
        out.images = _first_of_each(out.images, lambda ref: ref.location)
        out.captions = _first_of_each(out.captions, lambda record: record.id)  # a folder named twice
    return out


T = TypeVar("T")


def _first_of_each(items: list[T], key: Callable[[T], str]) -> list[T]:
    seen: set[str] = set()
    kept = []
    for item in items:
        name = key(item)
        if name not in seen:
            seen.add(name)
            kept.append(item)
    return kept


def read_item_bytes(uri: str, caption_column: str = "caption", image_column: str = "image") -> bytes:
    """The bytes of an indexed image by its uri: a file path, ``<shard>.tar#<key>`` or
    ``<file>.parquet#<key>`` (the container is scanned for the key: one shard's headers or
    small columns, never its other images). FileNotFoundError when there is no such item."""
    path, _, key = uri.rpartition("#")
    if not path or not container_files_named(path):
        return Path(uri).read_bytes()
    if path.lower().endswith(".tar"):
        found = read_tar_shard(path)
    else:
        found = read_parquet_images(path, caption_column, image_column)
    for ref in found.images:
        if ref.uri == uri:
            return ref.read_bytes()
    raise FileNotFoundError(f"{uri}: no sample {key!r} in {path}")


def container_files_named(path: str) -> bool:
    """Whether ``path`` is an existing tar shard or parquet file."""
    return is_container(path) and Path(path).is_file()
