"""The on-disk directory format: atomic commits, checks on read, stale-file cleanup."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from retrieval.core.atomic import atomic_open, write_json_atomic
from retrieval.core.errors import IndexFormatError
from retrieval.index.source import VectorSource
from retrieval.index.vector_index import build_vector_index
from retrieval.store.layout import MANIFEST_NAME, VECTOR_CHUNK_ROWS, directory_exists
from retrieval.store.reader import StoreReader
from retrieval.store.writer import StoreWriter


def test_atomic_open_leaves_target_untouched_when_the_write_fails(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("new")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_write_json_atomic_round_trips(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1, 2]}


def _write_build(root, value: float, several_chunks: bool = False):
    writer = StoreWriter(root, kind="index")
    rows = VECTOR_CHUNK_ROWS + 3 if several_chunks else 5
    vectors = np.full((rows, 4), value, np.float32)
    files = {
        "vectors": writer.write_vectors("clip", "image", vectors),
        "table": writer.write_table("images", pa.table({"id": [f"i{n}" for n in range(rows)]})),
        "faiss": writer.write_faiss("clip-image", build_vector_index(vectors[:5])),
    }
    writer.commit({"files": files}, [{"path": "bad.jpg", "reason": "truncated"}])
    return files


def test_commit_then_read_back(tmp_path):
    files = _write_build(tmp_path, 0.5, several_chunks=True)
    reader = StoreReader(tmp_path, kind="index")
    assert len(files["vectors"]) == 1  # written in chunks into one contiguous file
    vectors = reader.read_vectors(reader.manifest["files"]["vectors"])
    assert vectors.dtype == np.float32 and vectors.shape == (VECTOR_CHUNK_ROWS + 3, 4)
    assert np.all(vectors == 0.5)
    assert reader.read_faiss(files["faiss"]).ntotal == 5
    assert reader.read_table(files["table"]).num_rows == VECTOR_CHUNK_ROWS + 3
    assert reader.read_errors() == [{"path": "bad.jpg", "reason": "truncated"}]
    assert reader.manifest["errors"] == 1
    assert directory_exists(tmp_path)


def test_vectors_are_stored_as_float16(tmp_path):
    files = _write_build(tmp_path, 0.25)
    assert np.load(tmp_path / files["vectors"][0]).dtype == np.float16


def test_a_vector_source_of_several_parts_streams_into_one_file_and_empty_keeps_its_dimension(tmp_path):
    writer = StoreWriter(tmp_path, kind="index")
    parts = [
        np.random.default_rng(n).standard_normal((rows, 8)).astype(np.float16) for n, rows in enumerate((3, 70_000))
    ]
    written = writer.write_vectors("clip", "image", VectorSource(parts))
    assert len(written) == 1
    np.testing.assert_array_equal(np.load(tmp_path / written[0]), np.concatenate(parts))
    empty = writer.write_vectors("clip", "caption", VectorSource([np.zeros((0, 8), np.float16)]), first_shard=2)
    assert np.load(tmp_path / empty[0]).shape == (0, 8) and "-00002-" in empty[0]


def test_new_commit_replaces_old_files_and_uncommitted_build_changes_nothing(tmp_path):
    old = _write_build(tmp_path, 0.5)
    # a build that dies before commit: files written, manifest untouched
    dead = StoreWriter(tmp_path, kind="index")
    dead.write_vectors("clip", "image", np.ones((3, 4), np.float32))
    reader = StoreReader(tmp_path, kind="index")
    assert np.all(reader.read_vectors(reader.manifest["files"]["vectors"]) == 0.5)
    new = _write_build(tmp_path, 0.75)
    remaining = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert not (set(old["vectors"]) & remaining), "old build's files were not cleaned up"
    assert set(new["vectors"]) <= remaining
    assert len([p for p in remaining if p.startswith("vectors/")]) == 1  # the dead build's shard is gone too


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root, files: (root / files["vectors"][0]).unlink(), "missing"),
        (lambda root, files: (root / files["faiss"]).write_bytes(b"xx"), "damaged"),
        (lambda root, files: (root / MANIFEST_NAME).write_text("{not json"), "unreadable manifest"),
        (lambda root, files: (root / MANIFEST_NAME).write_text('{"format": 99, "kind": "index"}'), "format 99"),
        (lambda root, files: (root / MANIFEST_NAME).write_text('{"format": 1, "kind": "anchors"}'), "expected 'index'"),
    ],
)
def test_damaged_directories_give_errors_naming_the_file(tmp_path, damage, message):
    files = _write_build(tmp_path, 0.5)
    damage(tmp_path, files)
    with pytest.raises(IndexFormatError, match=message) as info:
        StoreReader(tmp_path, kind="index")
    assert str(tmp_path) in str(info.value)


def test_missing_and_non_index_directories(tmp_path):
    with pytest.raises(IndexFormatError, match="no such index"):
        StoreReader(tmp_path / "nope", kind="index")
    with pytest.raises(IndexFormatError, match="not a index directory|no manifest.json"):
        StoreReader(tmp_path, kind="index")
