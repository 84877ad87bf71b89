"""Parquet files with the images inside: img2dataset's ``parquet`` output (bytes in a ``jpg``
column) and dataset-hub exports (an ``image`` struct ``{bytes, path}``), as items.

The file is read one row group at a time and only its small columns (caption, key, url, ...):
never the whole file, never the image column during the scan. Each image item's opener
(:class:`ParquetCell`, picklable) reads its own row group's image column when the item is
decoded; the last row groups read are cached per process, so a worker decoding rows in order
reads each row group once. The caption column (``--caption-column``) gives a caption paired
with each image; every other column that is not bytes is kept as the item's metadata.
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.core.errors import InputError
from retrieval.sources.items import CaptionRecord, ImageRef, ItemError
from retrieval.sources.webdataset_tar import ShardItems

IMAGE_COLUMN_NAMES = ("jpg", "jpeg", "png", "webp", "image", "img")  # tried in order after the chosen column


def _is_bytes(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _is_image_struct(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and _is_bytes(kind.field("bytes").type)


def image_column(schema: Any, preferred: str) -> str | None:
    """The column holding image bytes: ``preferred`` if it does, else a known name, else the first such column."""
    usable = [f.name for f in schema if _is_bytes(f.type) or _is_image_struct(f.type)]
    for name in (preferred, *IMAGE_COLUMN_NAMES):
        if name in usable:
            return name
    return usable[0] if usable else None


@functools.lru_cache(maxsize=2)
def _row_group_column(path: str, stamp: str, row_group: int, column: str) -> Any:
    """One row group's image column (``stamp``: the file's size and mtime, so a rewrite is re-read)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(row_group, columns=[column]).column(0).combine_chunks()


@dataclass(frozen=True)
class ParquetCell:
    """Opener of one image cell: row ``row`` of row group ``row_group``, column ``column``."""

    path: str
    stamp: str
    row_group: int
    row: int
    column: str

    def __call__(self) -> bytes:
        value = _row_group_column(self.path, self.stamp, self.row_group, self.column)[self.row].as_py()
        if isinstance(value, dict):  # a hub image struct {bytes, path}
            value = value.get("bytes")
        if value is None:
            raise ValueError(f"no image bytes in column {self.column!r}")
        return bytes(value)


def _plain(value: Any) -> Any:
    """A metadata value JSON can hold (dates and other scalars as text)."""
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    return str(value)


def _key(row: dict[str, Any], number: int) -> str:
    key = row.get("key")
    return str(key) if isinstance(key, (str, int)) and str(key).strip() else f"row{number}"


def read_parquet_images(
    path: str | Path, caption_column: str = "caption", preferred_image_column: str = "image", source: str = ""
) -> ShardItems:
    """The items of one parquet file with image bytes (see the module docstring)."""
    import pyarrow.parquet as pq

    file = Path(path).resolve()
    out = ShardItems()
    try:
        parquet = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for data that is not parquet
        out.errors.append(ItemError(path=str(file), reason=f"not a readable parquet file ({e}); skipped"))
        return out
    schema = parquet.schema_arrow
    column = image_column(schema, preferred_image_column)
    if column is None:
        raise InputError(
            f"{file}: no column of image bytes (binary, or a struct {{bytes, path}}); "
            "a parquet of captions goes to `captions`"
        )
    kept = [f.name for f in schema if f.name != column and not _is_bytes(f.type) and not _is_image_struct(f.type)]
    stat = os.stat(file)
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    state = _Rows(file, source or str(file), column, stamp, caption_column if caption_column in kept else None, out)
    for group in range(parquet.num_row_groups):
        try:
            rows = (
                parquet.read_row_group(group, columns=kept).to_pylist()
                if kept
                else [{}] * parquet.metadata.row_group(group).num_rows
            )
        except Exception as e:  # a corrupt row group costs its rows, not the file
            state.skip_group(group, parquet.metadata.row_group(group).num_rows, e)
            continue
        for index, row in enumerate(rows):
            state.add(group, index, row)
    return out


class _Rows:
    """Turns the rows of one parquet file into items, numbering them across row groups."""

    def __init__(
        self, file: Path, source: str, column: str, stamp: str, caption_column: str | None, out: ShardItems
    ) -> None:
        self.file, self.source, self.column, self.stamp = file, source, column, stamp
        self.caption_column = caption_column
        self.out = out
        self.number = 0
        self.seen: set[str] = set()

    def skip_group(self, group: int, count: int, error: Exception) -> None:
        first = self.number + 1
        self.number += count
        self.out.errors.append(
            ItemError(
                path=str(self.file),
                row=first,
                reason=(
                    f"row group {group} (rows {first}..{self.number}) cannot be read ({type(error).__name__}: "
                    f"{error}); skipped"
                ),
            )
        )

    def add(self, group: int, index: int, row: dict[str, Any]) -> None:
        self.number += 1
        key = _key(row, self.number)
        if key in self.seen:
            self.out.errors.append(
                ItemError(path=str(self.file), row=self.number, reason=f"duplicate key {key!r}; skipped")
            )
            return
        self.seen.add(key)
        metadata = {name: _plain(value) for name, value in row.items()}
        uri = f"{self.file}#{key}"
        self.out.images.append(
            ImageRef(
                source=self.source,
                uri=uri,
                version=f"{self.stamp}:{group}:{index}",
                metadata=metadata,
                opener=ParquetCell(str(self.file), self.stamp, group, index, self.column),
            )
        )
        if self.caption_column is None:
            return
        text = row.get(self.caption_column)
        if not isinstance(text, str) or not text.strip():
            self.out.errors.append(
                ItemError(
                    path=str(self.file),
                    row=self.number,
                    kind="caption",
                    reason=f"row {key!r}: no caption in column {self.caption_column!r}; image kept without it",
                )
            )
            return
        self.out.captions.append(
            CaptionRecord(text=text.strip(), source=str(self.file), row=self.number, image=uri, metadata=metadata)
        )
