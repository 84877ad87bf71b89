"""export --format clip-retrieval: the layout clip back serves (npy shards, metadata parquet, FAISS inner-product
indexes, indices_paths.json), and the round trip: building from the export answers queries as the index did."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from serve_helpers import build_tiny_index

import retrieval
from retrieval.api.embeddings import EmbeddingsOptions, build_index_from_embeddings
from retrieval.api.export import export_index
from retrieval.cli.main import main
from retrieval.core.errors import InputError
from retrieval.store import clip_layout
from retrieval.store.manifest import manifest_digest


@pytest.fixture(scope="module")
def index_path(tmp_path_factory, tiny_clip_dir, small_collection) -> Path:
    """6 COCO photos with 30 paired captions and 2 captions without an image (one truncated JPEG skipped)."""
    return build_tiny_index(tmp_path_factory.mktemp("export") / "tiny", tiny_clip_dir, small_collection)


@pytest.fixture(scope="module")
def exported(index_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "tiny-clip-retrieval"
    result = CliRunner().invoke(main, ["export", "--index", str(index_path), "--format", "clip-retrieval", str(out)])
    assert result.exit_code == 0, result.output
    assert "exported 6 images and 32 captions (32 rows, 1 partition(s))" in result.output
    return out


def _clip_back_search(folder: Path, kind: str, query: np.ndarray, k: int) -> list[dict]:
    """What clip back does: the index memory-mapped, search_and_reconstruct, ids looked up in the metadata rows."""
    index = faiss.read_index(str(folder / f"{kind}.index"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    distances, ids, _ = index.search_and_reconstruct(query[None].astype(np.float32), k)
    rows = pq.read_table(folder / "metadata").to_pylist()
    return [{**rows[i], "similarity": float(d)} for d, i in zip(distances[0], ids[0], strict=True) if i >= 0]


def test_the_layout_is_what_clip_back_reads(index_path, exported):
    index = retrieval.open_index(index_path, device="cpu")
    assert sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()) == [
        "image.index",
        "img_emb/img_emb_0.npy",
        "indices_paths.json",
        "metadata/metadata_0.parquet",
        "text.index",
        "text_emb/text_emb_0.npy",
    ]
    image, text = np.load(exported / "img_emb" / "img_emb_0.npy"), np.load(exported / "text_emb" / "text_emb_0.npy")
    assert image.shape == text.shape == (32, 32) and image.dtype == np.float16
    rows = pq.read_table(exported / "metadata" / "metadata_0.parquet").to_pylist()
    assert len(rows) == 32 and list(rows[0])[:2] == ["image_path", "caption"]
    assert sum(row["image_path"] is None for row in rows) == 2  # the two captions without an image
    entry = json.loads((exported / "indices_paths.json").read_text())
    assert entry == {"tiny-clip-retrieval": {"indice_folder": str(exported.absolute()), "clip_model": "open_clip:tiny"}}
    assert faiss.read_index(str(exported / "image.index")).ntotal == 6
    assert faiss.read_index(str(exported / "text.index")).ntotal == 32
    query = index.text_encoder.encode_texts(["a plate of food"])[0]
    ours = index.text_to_image("a plate of food", k=6)
    theirs = _clip_back_search(exported, "image", query, 6)
    assert [row["image_path"] for row in theirs] == [hit.uri for hit in ours]
    assert [row["similarity"] for row in theirs] == pytest.approx([hit.score for hit in ours], abs=2e-3)
    captions = _clip_back_search(exported, "text", query, 5)
    assert [row["caption"] for row in captions] == [
        hit.caption for hit in index.text_to_caption("a plate of food", k=5)
    ]


def test_round_trip_gives_the_same_results(index_path, exported, tiny_clip_dir, tmp_path, small_collection):
    result = CliRunner().invoke(
        main,
        [
            "build-index",
            "--embeddings",
            str(exported),
            "--encoder",
            "open_clip:tiny",
            "--checkpoint",
            str(tiny_clip_dir),
            "--index",
            str(tmp_path / "back"),
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    before, after = (
        retrieval.open_index(index_path, device="cpu"),
        retrieval.open_index(tmp_path / "back", device="cpu"),
    )
    assert after.manifest["counts"] == before.manifest["counts"] == {"image": 6, "caption": 32}
    photo = sorted((small_collection / "images").glob("0*.jpg"))[0]
    for ask in (lambda i: i.text_to_image("a man riding a horse", k=6), lambda i: i.image_to_image(str(photo), k=6)):
        a, b = ask(before), ask(after)
        assert [(h.id, h.uri) for h in a] == [(h.id, h.uri) for h in b]  # file items keep their ids
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=2e-3)
    for ask in (
        lambda i: i.text_to_caption("a man riding a horse", k=8),
        lambda i: i.image_to_caption(str(photo), k=8),
    ):
        a, b = ask(before), ask(after)
        assert [(h.caption, h.image_uri) for h in a] == [(h.caption, h.image_uri) for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=2e-3)


def test_deleted_items_are_left_out(index_path, tmp_path):
    import shutil

    copy = Path(shutil.copytree(index_path, tmp_path / "copy"))
    index = retrieval.open_index(copy, device="cpu")
    gone = index.items("image")["uri"][0]
    retrieval.remove_from_index(copy, ids=[index.items("image")["id"][0]])
    report = export_index(copy, tmp_path / "out")
    rows = pq.read_table(tmp_path / "out" / "metadata").to_pylist()
    assert report.images == 5 and gone not in {row["image_path"] for row in rows}
    assert faiss.read_index(str(tmp_path / "out" / "image.index")).ntotal == 5


def test_refusals_leave_nothing_behind(index_path, tmp_path, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and is not an empty directory"):
        export_index(index_path, taken)
    assert os.listdir(taken) == ["keep.txt"]
    with pytest.raises(InputError, match="unknown export format 'faiss'"):
        export_index(index_path, tmp_path / "x", format="faiss")

    def fail(self, name, index):
        raise OSError("disk full")

    monkeypatch.setattr(clip_layout.ClipLayoutWriter, "write_faiss", fail)
    with pytest.raises(OSError):
        export_index(index_path, tmp_path / "half")
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # no half-written folder, no temporary one


def test_an_asif_index_is_refused(index_path, tmp_path):
    import shutil

    copy = Path(shutil.copytree(index_path, tmp_path / "asif"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["mode"] = "asif"
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["export", "--index", str(copy), str(tmp_path / "out")])
    assert result.exit_code != 0 and "an ASIF index (two encoders, no shared space) cannot be exported" in result.output
    assert not (tmp_path / "out").exists()


def test_round_trip_keeps_source_fields(tmp_path, tiny_clip_dir):
    """Items with metadata (url, key) come back with the same fields after export and --embeddings."""
    from test_clip_embeddings import _encoder, _parts, _photos, write_inference_output

    root = write_inference_output(tmp_path / "in", _parts(_photos(tmp_path / "photos"), _encoder(tiny_clip_dir)))
    options = EmbeddingsOptions(encoder="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu", progress=False)
    first = build_index_from_embeddings(root, tmp_path / "first", options)
    export_index(tmp_path / "first", tmp_path / "out")
    second = build_index_from_embeddings(tmp_path / "out", tmp_path / "second", options)
    a, b = first.text_to_image("a dog", k=6), second.text_to_image("a dog", k=6)
    assert [(h.uri, h.metadata) for h in a] == [(h.uri, h.metadata) for h in b]
