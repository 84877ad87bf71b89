"""Parquet files with the images inside (a dataset hub's ``{bytes, path}`` struct, img2dataset's
``jpg`` column) and img2dataset's ``files`` layout as ``--images``: captions paired, other columns
kept as metadata, row groups read lazily, a corrupt row group skipped and reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import require_shared_data
from test_sources_shards import QUERIES, QUIET, _choice, coco_samples

import retrieval
from retrieval import InputError
from retrieval.sources.inputs import read_image_sources
from retrieval.sources.parquet_images import read_parquet_images

N_PHOTOS = 16
ROW_GROUP = 5


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    require_shared_data()
    return coco_samples(N_PHOTOS)


def hub_parquet(path: Path, samples: list[dict], caption_column: str = "caption") -> Path:
    """Images the way a dataset hub exports them: an ``image`` struct {bytes, path}, plus text columns."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": s["file"].read_bytes(), "path": s["file"].name} for s in samples], image_type),
            caption_column: [s["caption"] for s in samples],
            "url": [s["json"]["url"] for s in samples],
            "score": [0.5 + i for i in range(len(samples))],
        }
    )
    pq.write_table(table, path, row_group_size=ROW_GROUP)
    return path


def img2dataset_parquet(path: Path, samples: list[dict]) -> Path:
    """The columns img2dataset's ``parquet`` output writes: image bytes in ``jpg``, then key, caption, url, ..."""
    table = pa.table(
        {
            "jpg": pa.array([s["file"].read_bytes() for s in samples], pa.binary()),
            "key": [s["key"] for s in samples],
            "caption": [s["caption"] for s in samples],
            "url": [s["json"]["url"] for s in samples],
            "status": ["success"] * len(samples),
            "width": pa.array([640] * len(samples), pa.int64()),
        }
    )
    pq.write_table(table, path, row_group_size=ROW_GROUP)
    return path


def test_hub_parquet_rows_become_paired_items_with_their_columns(tmp_path, samples):
    path = hub_parquet(tmp_path / "train-00000-of-00001.parquet", samples)
    got = read_image_sources([str(path)])
    assert not got.errors and len(got.images) == len(got.captions) == N_PHOTOS
    assert got.images[7].read_bytes() == samples[7]["file"].read_bytes()
    assert got.images[7].metadata == {"caption": samples[7]["caption"], "url": samples[7]["json"]["url"], "score": 7.5}
    assert [c.image_id for c in got.captions] == [ref.id for ref in got.images]
    assert got.images[0].uri == f"{path.resolve()}#row1"


def test_the_scan_never_reads_the_image_column(tmp_path, samples, monkeypatch):
    path = hub_parquet(tmp_path / "hub.parquet", samples)
    asked: list[tuple[int, tuple]] = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        asked.append((i, tuple(columns or ())))
        return original(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("the whole file was read"))
    got = read_parquet_images(path)
    assert asked == [(i, ("caption", "url", "score")) for i in range(4)]  # one row group at a time, small columns only
    asked.clear()
    for ref in got.images[: ROW_GROUP + 1]:
        ref.read_bytes()
    assert asked == [(0, ("image",)), (1, ("image",))]  # each row group's images read once, in order


def test_img2dataset_parquet_keys_and_a_chosen_caption_column(tmp_path, samples):
    got = read_image_sources([str(img2dataset_parquet(tmp_path / "00000.parquet", samples))])
    assert [ref.uri.rsplit("#", 1)[1] for ref in got.images] == [s["key"] for s in samples]
    assert got.images[0].metadata["status"] == "success" and "jpg" not in got.images[0].metadata
    renamed = hub_parquet(tmp_path / "hub.parquet", samples, caption_column="text")
    assert not read_image_sources([str(renamed)]).captions  # no "caption" column: images only
    chosen = read_image_sources([str(renamed)], caption_column="text")
    assert [c.text for c in chosen.captions] == [s["caption"] for s in samples]


def test_a_parquet_without_image_bytes_is_named(tmp_path):
    path = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"caption": ["a", "b"]}), path)
    with pytest.raises(InputError, match="captions.parquet: no column of image bytes"):
        read_image_sources([str(path)])


def _corrupt_row_group(path: Path, group: int) -> None:
    meta = pq.ParquetFile(path).metadata.row_group(group)
    column = next(
        meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "caption"
    )  # read by the scan
    data = bytearray(path.read_bytes())
    start = column.data_page_offset
    data[start : start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def test_a_corrupt_row_group_is_skipped_and_reported(tmp_path, samples):
    path = hub_parquet(tmp_path / "hub.parquet", samples)
    _corrupt_row_group(path, 1)
    got = read_parquet_images(path)
    assert len(got.images) == N_PHOTOS - ROW_GROUP
    assert [ref.uri.rsplit("#", 1)[1] for ref in got.images][ROW_GROUP : ROW_GROUP + 1] == [f"row{2 * ROW_GROUP + 1}"]
    [error] = got.errors
    assert error.path == str(path.resolve()) and error.row == ROW_GROUP + 1
    assert error.reason.startswith(f"row group 1 (rows {ROW_GROUP + 1}..{2 * ROW_GROUP}) cannot be read")


def files_layout(root: Path, samples: list[dict]) -> Path:
    """img2dataset's ``files`` output: 00000/000000017.jpg with .txt and .json sidecars."""
    for sample in samples:
        folder = root / sample["key"][:5]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample["file"], folder / f"{sample['key']}.jpg")
        (folder / f"{sample['key']}.txt").write_text(sample["caption"], encoding="utf-8")
        (folder / f"{sample['key']}.json").write_text(json.dumps(sample["json"]), encoding="utf-8")
    return root


def test_files_layout_brings_captions_and_json(tmp_path, samples):
    root = files_layout(tmp_path / "out", samples)
    (root / "00000" / "000000003.txt").unlink()  # the json's caption stands in
    (root / "00000" / "000000004.json").write_text("[1, 2]")
    got = read_image_sources([str(root)])
    assert len(got.images) == N_PHOTOS and got.images[0].path is not None
    assert got.images[0].metadata["url"] == samples[0]["json"]["url"]
    assert len(got.captions) == N_PHOTOS - 1 and {c.image_id for c in got.captions} <= {r.id for r in got.images}
    assert [e.reason for e in got.errors] == [
        "unreadable img2dataset sidecar (ValueError: metadata is a JSON list, not an object); image kept without it"
    ]
    plain = read_image_sources([str(samples[0]["file"].parent)])  # a folder of photos without sidecars is unchanged
    assert not plain.captions and all(ref.metadata is None for ref in plain.images)


@pytest.mark.slow
def test_the_same_queries_over_loose_photos_hub_parquet_and_files_layout(tmp_path, tiny_clip_dir, samples):
    loose = tmp_path / "loose"
    loose.mkdir()
    for sample in samples:
        shutil.copy(sample["file"], loose / sample["file"].name)
    name_of_url = {s["json"]["url"]: s["file"].name for s in samples}
    name_of_key = {s["key"]: s["file"].name for s in samples}
    hub_rows = {f"{(tmp_path / 'hub.parquet').resolve()}#row{i + 1}": s["json"]["url"] for i, s in enumerate(samples)}
    builds = {
        "files": ([loose], lambda hit, index: Path(hit.uri).name),
        "hub": ([hub_parquet(tmp_path / "hub.parquet", samples)], lambda hit, index: name_of_url[hub_rows[hit.uri]]),
        "img2dataset": (
            [img2dataset_parquet(tmp_path / "i2d.parquet", samples)],
            lambda hit, index: name_of_key[hit.uri.rsplit("#", 1)[1]],
        ),
        "layout": ([files_layout(tmp_path / "out", samples)], lambda hit, index: name_of_key[Path(hit.uri).stem]),
    }
    results = {}
    for name, (images, photo) in builds.items():
        index = retrieval.build_index(
            images=images,
            index=tmp_path / name,
            encoders=_choice(tiny_clip_dir),
            embed=QUIET,
        )
        if name != "files":  # every image has its caption, paired by id
            assert sorted(index.items("caption")["image_id"]) == sorted(index.items("image")["id"])
        results[name] = [[(photo(h, index), round(h.score, 5)) for h in index.text_to_image(q, k=6)] for q in QUERIES]
    assert results["hub"] == results["files"] == results["img2dataset"] == results["layout"]
