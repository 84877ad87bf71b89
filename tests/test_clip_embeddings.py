"""build-index --embeddings: clip-retrieval's inference output (img_emb/, text_emb/, metadata/) as an index,
nothing encoded but a check; bad folders stop with one line naming the file, and nothing built is lost."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import COCO, coco_pairs, require_shared_data

import retrieval
from retrieval import EncoderChoice
from retrieval.api.embeddings import EmbeddingsOptions, build_index_from_embeddings
from retrieval.cli.main import main
from retrieval.core.errors import EncoderMismatchError, InputError
from retrieval.encoders.registry import load_encoders


def _photos(root: Path, n: int = 6) -> list[tuple[Path, str]]:
    """``n`` COCO photos copied under ``root`` with their first caption each."""
    require_shared_data()
    rows = coco_pairs(n)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for name in dict.fromkeys(row["image"] for row in rows):
        path = (root / Path(name).name).resolve()
        shutil.copy(COCO / name, path)
        out.append((path, next(row["caption"] for row in rows if row["image"] == name)))
    return out


def write_inference_output(root: Path, parts: list[dict]) -> Path:
    """The folder clip-retrieval's inference writer leaves: per partition, float16 npy shards and a metadata
    parquet of image_path, caption and the sample's own fields, the number zero-padded to one width."""
    width = len(str(len(parts) - 1))
    for folder in ("img_emb", "text_emb", "metadata"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for number, part in enumerate(parts):
        name = str(number).zfill(width)
        np.save(root / "img_emb" / f"img_emb_{name}.npy", part["image"].astype(np.float16))
        np.save(root / "text_emb" / f"text_emb_{name}.npy", part["text"].astype(np.float16))
        pq.write_table(pa.table(part["metadata"]), root / "metadata" / f"metadata_{name}.parquet")
    return root


def _encoder(tiny_clip_dir):
    return load_encoders(EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"))[0]


def _parts(photos: list[tuple[Path, str]], encoder) -> list[dict]:
    """Two partitions of (photo, caption) samples embedded with ``encoder``; the last sample is known by its url
    only."""
    from PIL import Image

    image = encoder.encode_images([Image.open(path).convert("RGB") for path, _ in photos])
    text = encoder.encode_texts([caption for _, caption in photos])
    paths = [str(path) for path, _ in photos]
    paths[-1] = None
    meta = {
        "image_path": paths,
        "caption": [caption for _, caption in photos],
        "url": [f"http://127.0.0.1:8000/{path.name}" for path, _ in photos],
        "key": [f"{n:09d}" for n in range(len(photos))],
        "width": [640] * len(photos),
    }
    half = len(photos) // 2
    return [
        {"image": image[s], "text": text[s], "metadata": {k: v[s] for k, v in meta.items()}}
        for s in (slice(0, half), slice(half, None))
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_clip_dir):
    root = tmp_path_factory.mktemp("embeddings")
    photos = _photos(root / "photos")
    return write_inference_output(root / "out", _parts(photos, _encoder(tiny_clip_dir))), photos


def _options(tiny_clip_dir, **more) -> EmbeddingsOptions:
    return EmbeddingsOptions(
        encoder="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu", progress=False, **more
    )


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_builds_from_the_vectors_and_keeps_the_metadata(folder, tiny_clip_dir, tmp_path):
    root, photos = folder
    index = build_index_from_embeddings(root, tmp_path / "index", _options(tiny_clip_dir))
    assert index.manifest["counts"] == {"image": 6, "caption": 6} and index.manifest["sources"]["embeddings"] == [
        str(root)
    ]
    uris = index.items("image")["uri"]
    assert uris[:5] == [str(path) for path, _ in photos[:5]] and uris[5] == f"http://127.0.0.1:8000/{photos[5][0].name}"
    vectors = np.concatenate([np.load(root / "img_emb" / f"img_emb_{n}.npy") for n in (0, 1)]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    query = index.text_encoder.encode_texts(["a photo of a dog"])[0]
    expected = [uris[i] for i in np.argsort(-(vectors @ query), kind="stable")]
    hits = index.text_to_image("a photo of a dog", k=6)
    assert [hit.uri for hit in hits] == expected
    for hit in hits:
        assert hit.metadata["url"].endswith(Path(hit.uri).name) and hit.metadata["width"] == 640 and hit.width == 640
    captions = index.text_to_caption(photos[2][1], k=1)[0]
    assert (
        captions.caption == photos[2][1]
        and captions.image_uri == str(photos[2][0])
        and captions.metadata["key"] == "000000002"
    )
    # a caption's pairing holds for a url-only image too
    by_url = index.text_to_caption(photos[5][1], k=1)[0]
    assert by_url.image_uri == uris[5]
    like = index.image_to_image(str(photos[0][0]), k=1)[0]
    assert like.uri == str(photos[0][0]) and like.score > 0.99


def test_cli_build_and_json_query(folder, tiny_clip_dir, tmp_path):
    root, photos = folder
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "build-index",
            "--embeddings",
            str(root),
            "--encoder",
            "open_clip:tiny",
            "--checkpoint",
            str(tiny_clip_dir),
            "--index",
            str(tmp_path / "cli"),
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "indexed 6 images and 6 captions" in result.output and "nothing encoded" in result.output
    result = runner.invoke(
        main, ["text-to-image", "a dog", "--index", str(tmp_path / "cli"), "--json", "-k", "6", "--device", "cpu"]
    )
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert sorted(row["metadata"]["key"] for row in rows) == [f"{n:09d}" for n in range(6)]
    mixed = runner.invoke(
        main,
        [
            "build-index",
            "--embeddings",
            str(root),
            "--images",
            str(root),
            "--encoder",
            "open_clip:tiny",
            "--index",
            str(tmp_path / "mixed"),
        ],
    )
    assert mixed.exit_code == 2 and "--embeddings builds from the embedding folder alone" in mixed.output
    nothing = runner.invoke(main, ["build-index", "--embeddings", str(root), "--index", str(tmp_path / "none")])
    assert nothing.exit_code == 2 and "--embeddings needs --encoder" in nothing.output


def test_non_unit_vectors_are_normalised_with_a_warning(folder, tiny_clip_dir, tmp_path, caplog):
    root, _ = folder
    scaled = _copy(root, tmp_path)
    shard = scaled / "img_emb" / "img_emb_1.npy"
    np.save(shard, np.load(shard).astype(np.float32) * 3.0)
    with caplog.at_level(logging.WARNING, logger="retrieval.api.embeddings"):
        index = build_index_from_embeddings(scaled, tmp_path / "scaled", _options(tiny_clip_dir))
    assert "3 of 6 image vectors are not unit length" in caplog.text and str(shard) in caplog.text
    plain = build_index_from_embeddings(root, tmp_path / "plain", _options(tiny_clip_dir))
    a, b = index.text_to_image("a dog", k=6), plain.text_to_image("a dog", k=6)
    assert [h.uri for h in a] == [h.uri for h in b]
    assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=2e-3)


def test_embeddings_of_another_model_are_refused(tmp_path, tiny_clip_dir):
    from tiny_clip import make_tiny_clip

    other = _encoder(make_tiny_clip(tmp_path / "other-model", seed=7))
    root = write_inference_output(tmp_path / "out", _parts(_photos(tmp_path / "photos"), other))
    with pytest.raises(EncoderMismatchError, match="these embeddings were not made with open_clip:tiny"):
        build_index_from_embeddings(root, tmp_path / "index", _options(tiny_clip_dir))
    assert not (tmp_path / "index" / "manifest.json").exists()
    short = write_inference_output(
        tmp_path / "short",
        [
            {
                "image": np.ones((2, 16), np.float32),
                "text": np.ones((2, 16), np.float32),
                "metadata": {"image_path": ["a.jpg", "b.jpg"], "caption": ["a", "b"]},
            }
        ],
    )
    with pytest.raises(
        EncoderMismatchError,
        match=r"img_emb_0.npy: image vectors of dimension 16, but open_clip:tiny makes vectors of dimension 32",
    ):
        build_index_from_embeddings(short, tmp_path / "index", _options(tiny_clip_dir))


def _break_rows(root: Path) -> str:
    np.save(root / "text_emb" / "text_emb_1.npy", np.load(root / "text_emb" / "text_emb_1.npy")[:2])
    return r"text_emb_1.npy: 2 rows, but .*metadata_1.parquet: 3 rows"


def _break_missing(root: Path) -> str:
    (root / "img_emb" / "img_emb_0.npy").unlink()
    return r"img_emb/img_emb_0.npy: missing \(metadata_0.parquet has no image embeddings\)"


def _break_dtype(root: Path) -> str:
    np.save(root / "img_emb" / "img_emb_1.npy", np.arange(96, dtype=np.int32).reshape(3, 32))
    return r"img_emb_1.npy: a int32 array of shape \(3, 32\); expected \(rows, dim\) float vectors"


def _break_shape(root: Path) -> str:
    np.save(root / "text_emb" / "text_emb_0.npy", np.zeros(96, np.float16))
    return r"text_emb_0.npy: a float16 array of shape \(96,\); expected \(rows, dim\) float vectors"


def _break_pickle(root: Path) -> str:
    np.save(root / "img_emb" / "img_emb_0.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    return r"img_emb_0.npy: not a readable .npy array"


def _break_truncated_parquet(root: Path) -> str:
    path = root / "metadata" / "metadata_1.parquet"
    path.write_bytes(path.read_bytes()[:-20])
    return r"metadata_1.parquet: not a readable parquet file"


def _break_orphan_shard(root: Path) -> str:
    shutil.copy(root / "img_emb" / "img_emb_1.npy", root / "img_emb" / "img_emb_2.npy")
    return r"img_emb_2.npy: no metadata_2.parquet in"


def _break_zero_vector(root: Path) -> str:
    shard = np.load(root / "text_emb" / "text_emb_0.npy")
    shard[1] = 0
    np.save(root / "text_emb" / "text_emb_0.npy", shard)
    return r"text_emb_0.npy: row 1 is a zero vector"


BREAKAGES = [
    _break_rows,
    _break_missing,
    _break_dtype,
    _break_shape,
    _break_pickle,
    _break_truncated_parquet,
    _break_orphan_shard,
    _break_zero_vector,
]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__[7:])
def test_bad_folders_stop_with_one_line_and_the_old_index_survives(folder, tiny_clip_dir, tmp_path, breakage):
    root, _ = folder
    target = tmp_path / "index"
    before = build_index_from_embeddings(root, target, _options(tiny_clip_dir)).text_to_image("a dog", k=3)
    broken = _copy(root, tmp_path)
    message = breakage(broken)
    result = CliRunner().invoke(
        main,
        [
            "build-index",
            "--embeddings",
            str(broken),
            "--encoder",
            "open_clip:tiny",
            "--checkpoint",
            str(tiny_clip_dir),
            "--index",
            str(target),
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code != 0
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert re.search(message, error), error
    assert retrieval.open_index(target, device="cpu").text_to_image("a dog", k=3) == before


def test_a_corrupt_row_group_names_the_file(folder, tmp_path):
    from retrieval.sources.clip_embeddings import (
        gather_embedded_rows,
        open_embedding_folder,
    )

    root, _ = folder
    broken = _copy(root, tmp_path)
    path = broken / "metadata" / "metadata_0.parquet"
    table = pq.read_table(path)
    pq.write_table(table, path, compression="snappy", use_dictionary=False)
    data = bytearray(path.read_bytes())
    for offset in range(4, 200):  # the first column chunk's pages: damaged, the footer intact
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    opened = open_embedding_folder(broken)  # the footer still reads: counts agree
    with pytest.raises(InputError, match=r"metadata_0.parquet: cannot read its rows"):
        gather_embedded_rows(opened)


@pytest.mark.parametrize("left_out", ["text_emb", "img_emb"])
def test_an_image_only_or_text_only_run(folder, tiny_clip_dir, tmp_path, left_out):
    """clip-retrieval inference with --enable_text False (or --enable_image False) leaves one npy folder out."""
    root, photos = folder
    copy = _copy(root, tmp_path)
    shutil.rmtree(copy / left_out)
    index = build_index_from_embeddings(copy, tmp_path / "index", _options(tiny_clip_dir))
    if left_out == "text_emb":
        assert index.manifest["counts"] == {"image": 6, "caption": 0}
        assert index.image_to_image(str(photos[1][0]), k=1)[0].uri == str(photos[1][0])
    else:
        assert index.manifest["counts"] == {"image": 0, "caption": 6}
        hit = index.text_to_caption(photos[3][1], k=1)[0]
        assert hit.caption == photos[3][1] and hit.image_uri == str(photos[3][0])
