"""``where=`` filters: a SQL predicate over an items table, evaluated by DuckDB, as the positions that pass.

The table DuckDB sees holds ``position`` (the row's position, what the vector indexes return), the
stored item columns (``uri``, ``source``, ``label``, ``width``, ``height``, ``added``; captions:
``caption``, ``image_uri``, ...), the source's own metadata as a ``metadata`` struct
(``metadata.url``) and, where no item column has the name, each top-level metadata field as a column
of its own (``url``, ``status``). Only the predicate is user text: it is parsed as ONE expression
(``duckdb.SQLExpression``), so it cannot close the ``WHERE`` and append a query; and the connection
has external access (files, network, extensions) switched off and its configuration locked before
the predicate is read, so even a subquery can only see the registered items table.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from retrieval.core.errors import InputError
from retrieval.store.item_metadata import METADATA_COLUMN, decode_metadata

ADDED_COLUMN = "added"
FILTER_SECONDS = 10.0  # a predicate still running after this is interrupted (e.g. a subquery over a huge range())
FILTER_CACHE_SIZE = 32  # predicates whose allowed positions are kept, per index
LATER_COLUMNS = {  # item columns that indexes written by older versions lack
    "added": "the date items were added (indexes written before filters existed lack it)",
    "metadata": "source metadata (indexes written before it was stored lack it)",
}
DUCKDB_CONFIG = {
    "threads": 1,  # the predicate is cheap; the machine's cores belong to the searches
    "enable_external_access": False,  # no files, no network, no extension downloads
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
}


def _column(values: list[Any]) -> Any:
    """One metadata field as an arrow array: its own type when the values agree, else JSON text."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array(
            [None if value is None else value if isinstance(value, str) else json.dumps(value) for value in values],
            pa.string(),
        )


def filter_table(items: Any) -> Any:
    """The table a predicate is evaluated over: ``position``, the item columns, metadata struct and fields."""
    import pyarrow as pa

    table = items.drop_columns([METADATA_COLUMN]) if METADATA_COLUMN in items.column_names else items
    if ADDED_COLUMN in table.column_names and pa.types.is_string(table.schema.field(ADDED_COLUMN).type):
        at = table.column_names.index(ADDED_COLUMN)  # stored as ISO text: compared as a DATE
        table = table.set_column(at, ADDED_COLUMN, table.column(ADDED_COLUMN).cast(pa.date32()))
    table = table.append_column("position", pa.array(np.arange(items.num_rows, dtype=np.int64)))
    if METADATA_COLUMN not in items.column_names:
        return table
    rows = [decode_metadata(value) for value in items.column(METADATA_COLUMN).to_pylist()]
    names: dict[str, str] = {}  # SQL names are case-insensitive: of keys differing only in case, the first (sorted) one
    for name in sorted({name for row in rows for name in row if name}):
        names.setdefault(name.lower(), name)
    fields = {name: _column([row.get(name) for row in rows]) for name in names.values()}
    if fields:
        struct = pa.StructArray.from_arrays(
            list(fields.values()), names=list(fields), mask=pa.array([not row for row in rows])
        )
        table = table.append_column(METADATA_COLUMN, struct)
    else:
        table = table.append_column(METADATA_COLUMN, pa.nulls(items.num_rows, pa.struct([])))
    taken = {name.lower() for name in table.column_names}
    for name, column in fields.items():
        if name.lower() not in taken:  # an item column of the same name wins: metadata.<name> still reaches the field
            table = table.append_column(name, column)
    return table


def _message(error: Exception, columns: list[str], what: str) -> str:
    """DuckDB's error, trimmed to its first line, naming what the table does have."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    for name, why in LATER_COLUMNS.items():
        if f'"{name}"' in first and name not in columns:
            return f"{what}: no column {name!r} in this index ({why}); rebuild the index to filter on it"
    return f"{what}: {first}" + (f" (columns: {', '.join(columns)})" if "Binder" in type(error).__name__ else "")


def evaluate(table: Any, predicate: str, what: str = "where") -> np.ndarray:
    """Sorted int64 positions of the rows of ``table`` (see :func:`filter_table`) for which ``predicate`` holds.

    A predicate that does not parse as one expression, names an unknown column or fails to evaluate
    raises :class:`InputError` (one line: ``what``, DuckDB's own message, the columns there are).
    """
    import duckdb

    if not isinstance(predicate, str) or not predicate.strip():
        raise InputError(f"{what}: the predicate is empty")
    connection = duckdb.connect(":memory:", config=dict(DUCKDB_CONFIG))
    timer = threading.Timer(FILTER_SECONDS, connection.interrupt)
    try:
        connection.register("items", table)
        connection.execute("SET lock_configuration = true")
        timer.start()
        try:
            expression = duckdb.SQLExpression(predicate)
            relation = connection.table("items").filter(expression).project("position")
            positions = np.asarray(relation.fetchnumpy()["position"], dtype=np.int64)
        except duckdb.Error as e:
            if not timer.is_alive():
                raise InputError(f"{what}: still running after {FILTER_SECONDS:g} s; interrupted") from None
            raise InputError(_message(e, [name for name in table.column_names if name != "position"], what)) from None
    finally:
        timer.cancel()
        connection.close()
    return np.unique(positions)  # sorted, and never a row twice whatever the predicate does


class FilterCache:
    """What each (kind, predicate) allows, computed once and kept for the last ``size`` predicates.

    ``tables(kind)`` gives the items table of ``kind`` (read once, on the first filter of that kind);
    ``prepare(kind, positions)`` turns the sorted positions a predicate passes (deleted items included)
    into what is cached (e.g. a :class:`~retrieval.index.selection.Selection`). Thread-safe: a predicate
    asked by two threads at once may be evaluated twice, with the same result.
    """

    def __init__(
        self, tables: Callable[[str], Any], prepare: Callable[[str, np.ndarray], Any], size: int = FILTER_CACHE_SIZE
    ) -> None:
        self.tables = tables
        self.prepare = prepare
        self.size = size
        self._entries: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._views: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, kind: str, predicate: str) -> Any:
        """``prepare(kind, positions)`` for the ``kind`` items ``predicate`` holds for; cached."""
        key = (kind, predicate)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        positions = evaluate(self._view(kind), predicate, f"where {predicate!r} over {kind}s")
        value = self.prepare(kind, positions)
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    def _view(self, kind: str) -> Any:
        view = self._views.get(kind)
        if view is None:
            view = self._views[kind] = filter_table(self.tables(kind))
        return view
