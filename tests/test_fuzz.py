"""Property-based tests: caption-file readers and query parsing never fail with anything but our own errors.

Bounded (a few dozen examples each, no deadline) so the whole module runs in seconds.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import retrieval
from retrieval import EmbedOptions, EncoderChoice
from retrieval.core.errors import ImageDecodeError, InputError
from retrieval.sources.captions import read_caption_file
from retrieval.sources.items import CaptionFile

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)
SUFFIXES = [".txt", ".csv", ".tsv", ".jsonl"]
ENCODINGS = ["utf-8", "latin-1", "utf-16", "cp1252", "ascii"]
_names = itertools.count()

# any code point, lone surrogates included (they come from JSON escapes, and from undecodable file names)
any_text = st.text(
    st.characters(exclude_categories=()) | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=60
)
file_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)  # what a text file can hold


def _write(tmp_path: Path, suffix: str, data: bytes) -> Path:
    path = tmp_path / f"f{next(_names)}{suffix}"
    path.write_bytes(data)
    return path


def _read(path: Path, **options) -> CaptionFile | None:
    """Records or an InputError; anything else fails the test. Checks what every record must satisfy."""
    try:
        parsed = read_caption_file(path, **options)
    except InputError as e:
        assert str(e)
        return None
    for record in parsed.records:
        assert isinstance(record.text, str) and record.text == record.text.strip() and record.text
        record.text.encode("utf-8")  # storable: no lone surrogate gets into an index
        assert isinstance(record.row, int) and record.row >= 1
    for error in parsed.errors:
        assert error.kind == "caption" and error.reason and isinstance(error.row, int)
        json.dumps(error.to_json())
    return parsed


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from(SUFFIXES), encoding=st.sampled_from(ENCODINGS))
@example(data=b"\xef\xbb\xbfcaption\n\xff\xfe", suffix=".csv", encoding="utf-8")
@example(data=b'caption\n"unterminated', suffix=".csv", encoding="utf-8")
@example(data=b'{"caption": "\\ud800"}\n', suffix=".jsonl", encoding="utf-8")
@example(data=b"\x00\x00\x00", suffix=".tsv", encoding="utf-16")
def test_random_bytes_in_any_caption_file(tmp_path, data, suffix, encoding):
    _read(_write(tmp_path, suffix, data), encoding=encoding)


@FUZZ
@given(text=file_text, suffix=st.sampled_from(SUFFIXES), column=st.sampled_from(["caption", "text", "", "a b"]))
def test_random_text_in_any_caption_file(tmp_path, text, suffix, column):
    _read(_write(tmp_path, suffix, text.encode("utf-8")), caption_column=column or "caption")


@FUZZ
@given(
    rows=st.lists(st.lists(file_text.filter(lambda s: len(s) < 40), min_size=1, max_size=4), max_size=8),
    delimiter=st.sampled_from([",", "\t"]),
    bom=st.booleans(),
    crlf=st.booleans(),
)
def test_csv_and_tsv_round_trip(tmp_path, rows, delimiter, bom, crlf):
    """What csv.writer writes (quoted newlines, quotes, delimiters, NUL...), the reader reads back."""
    buffer = io.StringIO(newline="")
    # (csv.writer leaves a bare "\r" unquoted when the line ends are "\n": quote everything then)
    writer = csv.writer(
        buffer,
        delimiter=delimiter,
        lineterminator="\r\n" if crlf else "\n",
        quoting=csv.QUOTE_MINIMAL if crlf else csv.QUOTE_ALL,
    )
    writer.writerow(["caption", "other"])
    writer.writerows(rows)
    path = _write(
        tmp_path, ".csv" if delimiter == "," else ".tsv", (("\ufeff" if bom else "") + buffer.getvalue()).encode()
    )
    parsed = _read(path)
    kept = [row[0].strip() for row in rows if any(field.strip() for field in row)]
    expected = [text for text in kept if text]
    if parsed is None:
        assert not expected, f"valid rows were refused: {rows}"
        return
    assert [record.text for record in parsed.records] == expected
    assert len(parsed.errors) == len(kept) - len(expected)  # the empty captions, reported


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            st.dictionaries(st.sampled_from(["caption", "image", "x"]), json_values, max_size=3).map(json.dumps),
            json_values.map(json.dumps),
            st.text(max_size=30),
        ),
        max_size=8,
    )
)
def test_jsonl_lines_of_any_shape(tmp_path, lines):
    text = "\n".join(lines)
    parsed = _read(_write(tmp_path, ".jsonl", text.encode("utf-8", "surrogatepass")))
    if parsed is not None:
        assert all(record.row <= len(io.StringIO(text, newline=None).readlines()) for record in parsed.records)


@FUZZ
@given(template=st.text(alphabet="{}[]!:.<>^0123456789caption_xrs ", max_size=25))
def test_any_caption_template(tmp_path, template):
    path = _write(tmp_path, ".jsonl", b'{"caption": "a dog", "x": "7"}\n{"caption": "", "x": null}\n')
    _read(path, template=template)


def test_garbage_parquet(tmp_path):
    """Bytes that are no parquet file are an error naming the file, never a file of zero rows."""
    for data in (b"", b"PAR1", b"PAR1" + b"\0" * 64 + b"PAR1", bytes(range(256)) * 4):
        path = _write(tmp_path, ".parquet", data)
        with pytest.raises(InputError, match="not a readable parquet file") as refused:
            read_caption_file(path)
        assert str(path) in str(refused.value)


# --------------------------------------------------------------------------- queries


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory, tiny_clip_dir, small_collection):
    return retrieval.build_index(
        images=[small_collection / "images"],
        captions=[small_collection / "pairs.jsonl"],
        index=tmp_path_factory.mktemp("fuzz") / "index",
        encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
        embed=EmbedOptions(batch_size=4, workers=0, progress=False),
    )


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    query=st.one_of(any_text, st.text(max_size=3000), st.just("\x00" * 500), st.just("a " * 50_000)),
    k=st.integers(-3, 10**9),
)
@example(query="", k=1)
@example(query=" \t\n\u3000", k=5)
@example(query="\ud800\udfff\udc00", k=5)
def test_any_text_query(tiny_index, query, k):
    try:
        hits = tiny_index.text_to_image(query, k=k)
    except InputError as e:
        assert not query.strip() or k < 1, (query, k, e)
        return
    assert query.strip() and k >= 1
    assert len(hits) == min(k, 6)
    assert [hit.rank for hit in hits] == list(range(1, len(hits) + 1))
    assert all(np.isfinite(hit.score) for hit in hits)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)


@pytest.mark.parametrize("query", [None, b"a dog", 42, ["a dog"]])
def test_non_text_queries_are_input_errors(tiny_index, query):
    with pytest.raises(InputError):
        tiny_index.text_to_image(query)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jpg", ".png", ".gif", ".webp", ".tif", ".bmp"]))
def test_any_bytes_as_a_query_image(tmp_path, tiny_index, data, suffix):
    path = _write(tmp_path, suffix, data)
    try:
        hits = tiny_index.image_to_caption(path, k=3)
    except ImageDecodeError as e:
        assert e.reason and str(path) in str(e)
    else:
        assert len(hits) == 3
