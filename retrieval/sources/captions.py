"""Caption-file readers (txt, csv, tsv, jsonl, parquet): rows to caption records, with the rows that could not be read
reported."""

from __future__ import annotations

import csv
import io
import json
import logging
import string
from collections.abc import Mapping
from pathlib import Path

from retrieval.core.errors import InputError
from retrieval.sources.items import (
    CAPTION_EXTENSIONS,
    CaptionFile,
    CaptionRecord,
    ItemError,
)
from retrieval.sources.text_decoding import BadLine, decode_text

logger = logging.getLogger(__name__)


def template_fields(template: str) -> list[str]:
    """Top-level field names a ``str.format`` template uses ("" for positional fields)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InputError(f"invalid template {template!r}: {exc}") from None
    fields: list[str] = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        name = field.split(".", 1)[0].split("[", 1)[0]
        if name.isdigit():
            name = ""
        if name not in fields:
            fields.append(name)
    return fields


def render_template(template: str, values: Mapping[str, str], where: str) -> str:
    """Format ``template`` with ``values``; a bad format spec is an InputError."""
    try:
        return template.format_map(values)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise InputError(f"{where}: cannot apply template {template!r}: {exc}") from None


# A reader yields (columns, rows, errors); rows are (row number, {column: value}).
_Rows = list[tuple[int, dict[str, object]]]


def _decode_error(path: Path, bad: BadLine, encoding: str, row: int) -> ItemError:
    logger.warning("%s line %d: %s", path, bad.line, bad.describe(encoding))
    return ItemError(
        path=str(path), reason=bad.describe(encoding), kind="caption", row=row, line=bad.line, byte=bad.byte
    )


def _read_txt(path: Path, encoding: str, caption_column: str) -> tuple[list[str], _Rows, list[ItemError]]:
    """One caption per line; blank lines skipped, undecodable lines reported."""
    decoded = decode_text(path, encoding)
    rows: _Rows = []
    errors: list[ItemError] = []
    for number, line in enumerate(io.StringIO(decoded.text, newline=None), start=1):
        if number in decoded.bad_lines:
            errors.append(_decode_error(path, decoded.bad_lines[number], encoding, number))
        elif line.strip():
            rows.append((number, {caption_column: line}))
    return [caption_column], rows, errors


def _read_delimited(path: Path, encoding: str, delimiter: str) -> tuple[list[str], _Rows, list[ItemError]]:
    """CSV/TSV with a header row; records numbered from 1 after the header, undecodable ones reported."""
    decoded = decode_text(path, encoding, header_lines=1)
    reader = csv.reader(io.StringIO(decoded.text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows: _Rows = []
    errors: list[ItemError] = []
    last_line = 0
    try:
        for fields in reader:
            first_line, last_line = last_line + 1, reader.line_num
            if not fields or not any(f.strip() for f in fields):
                continue
            if header is None:
                header = [f.strip() for f in fields]
                continue
            number = len(rows) + len(errors) + 1
            bad = decoded.first_bad(first_line, last_line)
            if bad is not None:
                errors.append(_decode_error(path, bad, encoding, number))
            else:
                rows.append((number, dict(zip(header, fields, strict=False))))
    except csv.Error as exc:
        kind = "CSV" if delimiter == "," else "TSV"
        raise InputError(f"{path}: malformed {kind} near line {reader.line_num}: {exc}") from None
    return header or [], rows, errors


def _read_jsonl(path: Path, encoding: str) -> tuple[list[str], _Rows, list[ItemError]]:
    """One JSON object per line; bad lines become ItemErrors."""
    decoded = decode_text(path, encoding)
    columns: dict[str, None] = {}
    rows: _Rows = []
    errors: list[ItemError] = []
    for number, line in enumerate(io.StringIO(decoded.text, newline=None), start=1):
        if number in decoded.bad_lines:
            errors.append(_decode_error(path, decoded.bad_lines[number], encoding, number))
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            reason = f"invalid JSON: {exc.msg} (column {exc.colno})"
        else:
            if isinstance(obj, dict):
                columns.update(dict.fromkeys(str(k) for k in obj))
                rows.append((number, {str(k): v for k, v in obj.items()}))
                continue
            reason = f"expected a JSON object, got {type(obj).__name__}"
        logger.warning("%s line %d: %s", path, number, reason)
        errors.append(ItemError(path=str(path), reason=reason, kind="caption", row=number))
    return list(columns), rows, errors


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for non-parquet data
        raise InputError(f"{path}: not a readable parquet file: {exc}") from None


def _read_parquet(path: Path, wanted: list[str]) -> _Rows:
    """Rows of the wanted columns, numbered from 1."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=wanted)
    except Exception as exc:
        raise InputError(f"{path}: not a readable parquet file: {exc}") from None
    return [(i, row) for i, row in enumerate(table.to_pylist(), start=1)]


def _as_text(value: object) -> str | None:
    """Scalar cell value as text (None -> ""); None for non-scalars."""
    if value is None:
        return ""
    if isinstance(value, (str, int, float, bool)):
        return str(value)
    return None


def _check_columns(path: Path, columns: list[str], caption_column: str, template: str | None) -> None:
    """Raise InputError when the caption column / template fields are missing."""
    available = ", ".join(columns) if columns else "(none)"
    if template is not None:
        for field in template_fields(template):
            if field not in columns:
                shown = "{" + field + "}" if field else "a positional {}"
                raise InputError(f"{path}: template field {shown} is not a column; available columns: {available}")
    elif caption_column not in columns:
        raise InputError(
            f"{path}: no caption column {caption_column!r}; available columns: {available} "
            "(choose one with `CaptionOptions.caption_column`)"
        )


def _row_text(row: Mapping[str, object], caption_column: str, template: str | None, where: str) -> str:
    """Caption text for one row, or raise ValueError with the reason it has none."""
    if template is None:
        text = _as_text(row.get(caption_column))
        if text is None:
            raise ValueError(f"caption is not text ({type(row.get(caption_column)).__name__})")
    else:
        values = {k: ("" if v is None else str(v)) for k, v in row.items()}
        missing = [f for f in template_fields(template) if f not in values]
        if missing:
            raise ValueError(f"missing field {missing[0]!r}")
        text = render_template(template, values, where)
    text = text.strip()
    if not text:
        raise ValueError("empty caption")
    check_unicode(text, "caption")
    return text


def check_unicode(text: str, what: str) -> None:
    """Raise ValueError for text that cannot be stored as UTF-8 (a lone surrogate, e.g. from a JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} is not valid Unicode (lone surrogate {text[exc.start]!r} at character {exc.start})"
        ) from None


def _row_image(row: Mapping[str, object], image_column: str, base: Path) -> Path:
    """Resolved image path of a pairs row, or raise ValueError."""
    value = _as_text(row.get(image_column))
    if value is None or not value.strip():
        raise ValueError("empty image path")
    check_unicode(value, "image path")
    image = Path(value.strip()).expanduser()
    return (image if image.is_absolute() else base / image).resolve()


def _build_records(
    path: Path,
    rows: _Rows,
    errors: list[ItemError],
    caption_column: str,
    image_column: str | None,
    template: str | None,
) -> CaptionFile:
    """Turn raw rows into CaptionRecords, collecting per-row errors."""
    source = str(path)
    base = path.parent
    records: list[CaptionRecord] = []
    for number, row in rows:
        try:
            text = _row_text(row, caption_column, template, source)
            image = _row_image(row, image_column, base) if image_column else None
        except ValueError as exc:
            errors.append(ItemError(path=source, reason=str(exc), kind="caption", row=number))
            continue
        records.append(CaptionRecord(text=text, source=source, row=number, image=image))
    errors.sort(key=lambda e: e.row or 0)
    if not records:
        detail = ""
        if errors:
            first = errors[0]
            detail = f" ({len(errors)} rows skipped; first: row {first.row}: {first.reason})"
        raise InputError(f"no captions in {path}{detail}")
    if errors:
        logger.warning(
            "%s: skipped %d of %d rows (first: row %s: %s)",
            path,
            len(errors),
            len(errors) + len(records),
            errors[0].row,
            errors[0].reason,
        )
    return CaptionFile(path=path, records=records, errors=errors)


def read_caption_file(
    path: str | Path,
    caption_column: str = "caption",
    image_column: str = "image",
    template: str | None = None,
    encoding: str = "utf-8",
) -> CaptionFile:
    """Read captions (and optional image paths) from a .txt/.csv/.tsv/.jsonl/.parquet file."""
    file = Path(path).expanduser().absolute()
    try:
        check_unicode(str(file), "file name")
    except ValueError as exc:
        raise InputError(f"{path}: {exc}; rename the file") from None
    suffix = file.suffix.lower()
    if suffix not in CAPTION_EXTENSIONS:
        raise InputError(
            f"{path}: unsupported caption file type {suffix or '(none)'!r}; supported: {', '.join(CAPTION_EXTENSIONS)}"
        )
    if not file.exists():
        raise InputError(f"{path}: no such file")
    if not file.is_file():
        raise InputError(f"{path}: not a file")
    errors: list[ItemError] = []
    try:
        if suffix == ".parquet":
            columns = _parquet_columns(file)
        elif suffix == ".txt":
            columns, rows, errors = _read_txt(file, encoding, caption_column)
        elif suffix == ".jsonl":
            columns, rows, errors = _read_jsonl(file, encoding)
        else:
            columns, rows, errors = _read_delimited(file, encoding, "," if suffix == ".csv" else "\t")
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not columns and not errors:
        raise InputError(f"no captions in {file} (file is empty)")
    if columns or not errors:
        _check_columns(file, columns, caption_column, template)
    image_col = image_column if image_column in columns else None
    if suffix == ".parquet":
        wanted = template_fields(template) if template is not None else [caption_column]
        wanted = list(dict.fromkeys(wanted + ([image_col] if image_col else [])))
        rows = _read_parquet(file, wanted)
    return _build_records(file, rows, errors, caption_column, image_col, template)
