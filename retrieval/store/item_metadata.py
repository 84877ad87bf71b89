"""The ``metadata`` column of the items tables: a source's own fields per item, stored as a JSON string.

Indexes written before the column existed (format v1 all the same) have no such column: their
items read back with empty metadata, and an update that appends rows adds the column (nulls for
the old rows) instead of failing on the different schema.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

METADATA_COLUMN = "metadata"


def _plain(value: Any) -> Any:
    """A JSON-ready form of ``value`` (numpy scalars and arrays, dates, bytes as a length note)."""
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"  # image bytes are the item itself, not metadata
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _finite(value: Any) -> Any:
    """NaN and infinities (pandas' missing values) become None: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def encode_metadata(metadata: Mapping[str, Any] | None) -> str | None:
    """The stored form of one item's metadata: a JSON object as text, None when there is none."""
    if not metadata:
        return None
    plain = json.loads(json.dumps({str(key): value for key, value in metadata.items()}, default=_plain, allow_nan=True))
    return json.dumps(_finite(plain), ensure_ascii=False, allow_nan=False, sort_keys=True)


def decode_metadata(stored: Any) -> dict[str, Any]:
    """One item's metadata as a dict (empty for a null cell, a missing column, or text that is not a JSON object)."""
    if not stored:
        return {}
    if isinstance(stored, Mapping):
        return dict(stored)
    try:
        value = json.loads(stored)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def metadata_at(table: Mapping[str, Sequence[Any]], position: int) -> dict[str, Any]:
    """The metadata of row ``position`` of an items table read with ``to_pydict()`` (empty without the column)."""
    column = table.get(METADATA_COLUMN)
    return decode_metadata(column[position]) if column is not None else {}


def metadata_array(values: Sequence[Mapping[str, Any] | None]) -> pa.Array:
    """The ``metadata`` column for a list of per-item mappings."""
    import pyarrow as pa

    return pa.array([encode_metadata(value) for value in values], pa.string())


def append_rows(previous: pa.Table, table: pa.Table) -> pa.Table:
    """``previous`` with the rows of ``table`` appended; a column only one side has is null on the other.

    This is what lets ``add`` extend an index written before a column (e.g. ``metadata``) existed.
    """
    import pyarrow as pa

    if not previous.num_rows:
        return table
    for name in table.column_names:
        if name not in previous.column_names:
            previous = previous.append_column(
                table.schema.field(name), pa.nulls(previous.num_rows, table.schema.field(name).type)
            )
    for name in previous.column_names:
        if name not in table.column_names:
            table = table.append_column(
                previous.schema.field(name), pa.nulls(table.num_rows, previous.schema.field(name).type)
            )
    return pa.concat_tables([previous, table.select(previous.column_names).cast(previous.schema)])
