"""Tests for retrieval.sources:  finding images, reading caption files, decoding images."""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import random
import struct
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from retrieval.core.errors import ImageDecodeError, InputError
from retrieval.sources.captions import read_caption_file
from retrieval.sources.discovery import (
    find_images,
    labelled_folder_images,
    labelled_folder_pairs,
)
from retrieval.sources.items import (
    IMAGE_EXTENSIONS,
    CaptionFile,
    CaptionRecord,
    ImageRef,
    ItemError,
    LoadedImage,
    load_image,
    normalize_image,
    stable_id,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IMAGENET = DATA / "imagenet-sample"
CIFAR = DATA / "cifar10-test" / "test"
COCO = DATA / "coco-train-mini"
TENCH = IMAGENET / "n01440764_tench.JPEG"

needs_data = pytest.mark.skipif(not TENCH.is_file(), reason="shared data not available")


# --------------------------------------------------------------------------- helpers


def _png(path: Path, img: Image.Image, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _tiny(path: Path, color: tuple[int, int, int] = (10, 20, 30)) -> Path:
    return _png(path, Image.new("RGB", (4, 3), color))


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def _patch_png_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR width/height of a PNG and fix the chunk CRC."""
    out = bytearray(data)
    assert out[12:16] == b"IHDR"
    out[16:24] = struct.pack(">II", width, height)
    out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    return bytes(out)


def _real_photo(size: tuple[int, int] = (96, 64)) -> Image.Image:
    if TENCH.is_file():
        return Image.open(TENCH).convert("RGB").resize(size)
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _pixels(img: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(int(c) for c in px) for px in np.asarray(img).reshape(-1, len(img.getbands()))]


def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{b.png, a.jpg, sub/c.JPEG, sub/deep/d.webp, .hidden/e.png, .f.png, notes.txt}"""
    root = tmp_path / "photos"
    _tiny(root / "b.png")
    _tiny(root / "a.jpg")
    _png(root / "sub" / "c.JPEG", Image.new("RGB", (2, 2)), format="JPEG")
    _png(root / "sub" / "deep" / "d.webp", Image.new("RGB", (2, 2)), format="WEBP")
    _tiny(root / ".hidden" / "e.png")
    _tiny(root / ".f.png")
    _write(root / "notes.txt", "not an image")
    return root


# --------------------------------------------------------------------------- ids


def test_stable_id_format_and_determinism() -> None:
    sid = stable_id("img", "/a/b.jpg")
    expected = hashlib.sha1(b"/a/b.jpg").hexdigest()[:16]
    assert sid == f"img-{expected}"
    assert stable_id("cap", "f", 1, "x") == "cap-" + hashlib.sha1(b"f\x001\x00x").hexdigest()[:16]
    assert stable_id("cap", "f", 1, "x") != stable_id("cap", "f", 2, "x")


def test_image_ref_id_matches_caption_image_id(tmp_path: Path) -> None:
    path = _tiny(tmp_path / "x.png").resolve()
    ref = ImageRef(path=path, source=str(tmp_path))
    rec = CaptionRecord(text="t", source="s", row=1, image=path)
    assert ref.id == rec.image_id == stable_id("img", str(path))
    assert CaptionRecord(text="t", source="s", row=1).image_id is None
    assert rec.id == stable_id("cap", "s", 1, "t")


def test_item_error_to_json() -> None:
    err = ItemError(path="f.jsonl", reason="invalid JSON", kind="caption", row=3)
    assert err.to_json() == {"path": "f.jsonl", "reason": "invalid JSON", "kind": "caption", "row": 3}
    assert json.loads(json.dumps(ItemError("a.jpg", "x").to_json()))["kind"] == "image"


def test_image_extensions() -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} == IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- find_images


def test_find_images_folder_recursive_sorted_skips_hidden(tree: Path) -> None:
    refs = find_images([tree])
    names = [r.path.relative_to(tree.resolve()).as_posix() for r in refs]
    assert names == ["a.jpg", "b.png", "sub/c.JPEG", "sub/deep/d.webp"]
    assert all(r.path.is_absolute() and r.source == str(tree) and r.label is None for r in refs)


def test_find_images_dedupes_keeping_first_source(tree: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.png"
    link.symlink_to(tree / "b.png")
    refs = find_images([str(tree / "b.png"), tree, link])
    paths = [r.path for r in refs]
    assert len(paths) == len(set(paths)) == 4
    assert refs[0].path == (tree / "b.png").resolve()
    assert refs[0].source == str(tree / "b.png")
    assert [r.source for r in refs[1:]] == [str(tree)] * 3


def test_find_images_order_follows_arguments(tree: Path) -> None:
    refs = find_images([tree / "sub", tree / "a.jpg"])
    assert [r.path.name for r in refs] == ["c.JPEG", "d.webp", "a.jpg"]


def test_find_images_glob(tree: Path) -> None:
    flat = find_images([str(tree / "*.png")])
    assert [r.path.name for r in flat] == ["b.png"]  # hidden .f.png is not matched
    deep = find_images([str(tree / "**" / "*.*")])
    assert [r.path.name for r in deep] == ["a.jpg", "b.png", "c.JPEG", "d.webp"]
    assert {r.source for r in deep} == {str(tree / "**" / "*.*")}


def test_find_images_glob_matching_folders_searches_them(tree: Path) -> None:
    refs = find_images([str(tree / "s*")])
    assert [r.path.name for r in refs] == ["c.JPEG", "d.webp"]


def test_find_images_explicit_file_and_uppercase_extension(tree: Path) -> None:
    refs = find_images([tree / "sub" / "c.JPEG"])
    assert len(refs) == 1 and refs[0].path == (tree / "sub" / "c.JPEG").resolve()
    assert refs[0].id == stable_id("img", str(refs[0].path))


def test_find_images_accepts_single_path(tree: Path) -> None:
    assert len(find_images(str(tree))) == 4  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda t: str(t / "nope"), "no such file or directory"),
        (lambda t: str(_write(t / "empty" / "readme.txt", "x").parent), "folder contains no images"),
        (lambda t: str(t / "*.gif"), "pattern matches no images"),
        (lambda t: str(_write(t / "notes.txt", "x")), "not an image file extension"),
    ],
    ids=["missing", "empty-folder", "glob-no-match", "non-image-file"],
)
def test_find_images_input_errors(tmp_path: Path, make, expect: str) -> None:
    arg = make(tmp_path)
    with pytest.raises(InputError) as info:
        find_images([arg])
    message = str(info.value)
    assert expect in message and arg in message and "\n" not in message


def test_find_images_empty_folder_error_when_only_hidden(tmp_path: Path) -> None:
    _tiny(tmp_path / "d" / ".x.png")
    with pytest.raises(InputError, match="no images"):
        find_images([tmp_path / "d"])


def test_find_images_symlink_loop_does_not_hang(tmp_path: Path) -> None:
    root = tmp_path / "r"
    _tiny(root / "a" / "x.png")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    (root / "self").symlink_to(root / "self")  # a link to itself
    (root / "broken.png").symlink_to(root / "gone.png")
    refs = find_images([root])
    assert [r.path.name for r in refs] == ["x.png"]


# --------------------------------------------------------------------------- labelled folders


def test_labelled_folder_images(tmp_path: Path) -> None:
    root = tmp_path / "lab"
    _tiny(root / "cat" / "1.png")
    _tiny(root / "cat" / "nested" / "2.png")
    _tiny(root / "sea_lion" / "3.jpg")
    _tiny(root / ".cache" / "4.png")
    _tiny(root / "top.png")  # not under a label folder
    refs = labelled_folder_images(root)
    assert [(r.label, r.path.name) for r in refs] == [
        ("cat", "1.png"),
        ("cat", "2.png"),
        ("sea_lion", "3.jpg"),
    ]
    assert all(r.source == str(root) for r in refs)


def test_labelled_folder_pairs(tmp_path: Path) -> None:
    root = tmp_path / "lab"
    _tiny(root / "sea_lion" / "1.png")
    _tiny(root / "cat" / "2.png")
    recs = labelled_folder_pairs(root)
    assert [(r.row, r.text, r.label) for r in recs] == [
        (1, "a photo of a cat", "cat"),
        (2, "a photo of a sea lion", "sea_lion"),
    ]
    assert recs[0].image == (root / "cat" / "2.png").resolve()
    assert recs[0].source == str(root)
    assert recs[0].image_id == labelled_folder_images(root)[0].id
    custom = labelled_folder_pairs(root, "{label}!")
    assert [r.text for r in custom] == ["cat!", "sea lion!"]


@pytest.mark.parametrize("template", ["a {class_name}", "a {}", "{label} {0}", "{label"])
def test_labelled_folder_pairs_bad_template(tmp_path: Path, template: str) -> None:
    _tiny(tmp_path / "cat" / "1.png")
    with pytest.raises(InputError, match="template"):
        labelled_folder_pairs(tmp_path, template)


def test_labelled_folder_errors(tmp_path: Path) -> None:
    _tiny(tmp_path / "flat" / "x.png")
    _write(tmp_path / "txtonly" / "cat" / "a.txt", "x")
    for root, expect in [
        (tmp_path / "flat", "no label sub-folders with images"),
        (tmp_path / "txtonly", "no label sub-folders with images"),
        (tmp_path / "missing", "no such directory"),
        (tmp_path / "flat" / "x.png", "not a directory"),
    ]:
        with pytest.raises(InputError, match=expect) as info:
            labelled_folder_images(root)
        assert str(root) in str(info.value)


@needs_data
def test_labelled_folder_cifar() -> None:
    refs = labelled_folder_images(CIFAR)
    counts = Counter(r.label for r in refs)
    assert len(counts) == 10 and set(counts.values()) == {1000}
    pairs = labelled_folder_pairs(CIFAR)
    assert len(pairs) == 10_000 and pairs[0].text == "a photo of a airplane"
    assert pairs[0].label == "airplane" and pairs[-1].label == "truck"
    assert [p.row for p in pairs[:3]] == [1, 2, 3]


# --------------------------------------------------------------------------- caption files


def test_txt_blank_lines_and_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.txt", "  a dog \n\n   \nthe cat\n")
    cf = read_caption_file(path)
    assert isinstance(cf, CaptionFile) and not cf.is_pairs and cf.errors == []
    assert [(r.text, r.row) for r in cf.records] == [("a dog", 1), ("the cat", 4)]
    assert cf.records[0].source == str(path) and cf.records[0].image is None


def test_txt_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9 au lait\r\nsecond\r\n\r\nthird")
    cf = read_caption_file(path)
    assert [(r.text, r.row) for r in cf.records] == [("café au lait", 1), ("second", 2), ("third", 4)]


def test_txt_template_uses_caption_column(tmp_path: Path) -> None:
    cf = read_caption_file(_write(tmp_path / "c.txt", "dog\ncat\n"), template="a photo of a {caption}")
    assert [r.text for r in cf.records] == ["a photo of a dog", "a photo of a cat"]


def test_csv_quoted_newlines_and_row_numbers(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "caption"])
        writer.writerow(["1", "line one\nline two"])
        writer.writerow(["2", "  "])
        writer.writerow(["3", 'a "quoted", word'])
    cf = read_caption_file(path)
    assert [(r.text, r.row) for r in cf.records] == [("line one\nline two", 1), ('a "quoted", word', 3)]
    assert cf.errors == [ItemError(path=str(path), reason="empty caption", kind="caption", row=2)]
    assert not cf.is_pairs


def test_csv_pairs_resolve_relative_to_caption_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    _tiny(data / "img" / "a.png")
    absolute = _tiny(tmp_path / "elsewhere" / "b.png").resolve()
    _write(data / "pairs.csv", f"image,caption\nimg/a.png,first\n{absolute},second\n,third\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cf = read_caption_file(data / "pairs.csv")
    assert cf.is_pairs
    assert [(r.text, r.image) for r in cf.records] == [
        ("first", (data / "img" / "a.png").resolve()),
        ("second", absolute),
    ]
    assert [(e.row, e.reason, e.kind) for e in cf.errors] == [(3, "empty image path", "caption")]
    assert cf.records[0].image_id == find_images([data / "img"])[0].id


def test_pairs_do_not_check_image_existence(tmp_path: Path) -> None:
    cf = read_caption_file(_write(tmp_path / "p.csv", "image,caption\nmissing.jpg,x\n"))
    assert cf.records[0].image == (tmp_path / "missing.jpg").resolve()


def test_relative_caption_path_gives_absolute_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "p.csv", "image,caption\na.png,x\n")
    monkeypatch.chdir(tmp_path)
    cf = read_caption_file("p.csv")
    assert cf.records[0].image == (tmp_path / "a.png").resolve()
    assert Path(cf.records[0].source).is_absolute()


def test_tsv_with_custom_columns(tmp_path: Path) -> None:
    text = 'file\ttext\tother\nx.jpg\thello, world\t1\ny.jpg\t"multi\nline"\t2\n'
    path = _write(tmp_path / "c.tsv", text)
    cf = read_caption_file(path, caption_column="text", image_column="file")
    assert [(r.text, r.row, r.image.name) for r in cf.records] == [
        ("hello, world", 1, "x.jpg"),
        ("multi\nline", 2, "y.jpg"),
    ]


def test_jsonl_bad_line_in_middle(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [
        json.dumps({"caption": "one", "image": "a.jpg"}),
        json.dumps({"caption": "two", "image": "b.jpg"}),
        '{"caption": "broken", ',
        "",
        "[1, 2]",
        json.dumps({"caption": "five", "image": "c.jpg", "extra": 5}),
        json.dumps({"caption": "   ", "image": "d.jpg"}),
    ]
    path = _write(tmp_path / "c.jsonl", "\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="retrieval.sources.captions"):
        cf = read_caption_file(path)
    assert [(r.text, r.row) for r in cf.records] == [("one", 1), ("two", 2), ("five", 6)]
    assert [(e.row, e.kind) for e in cf.errors] == [(3, "caption"), (5, "caption"), (7, "caption")]
    assert "invalid JSON" in cf.errors[0].reason
    assert "JSON object" in cf.errors[1].reason and cf.errors[2].reason == "empty caption"
    assert any("line 3" in rec.getMessage() for rec in caplog.records)
    assert cf.is_pairs and cf.records[2].image == (tmp_path / "c.jpg").resolve()


def test_jsonl_non_string_values(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", '{"caption": 42}\n{"caption": null}\n{"caption": ["x"]}\n')
    cf = read_caption_file(path)
    assert [r.text for r in cf.records] == ["42"]
    assert [(e.row, e.reason) for e in cf.errors] == [(2, "empty caption"), (3, "caption is not text (list)")]


def test_jsonl_template_missing_field_in_one_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", '{"name": "dog"}\n{"other": 1}\n')
    cf = read_caption_file(path, template="a photo of a {name}")
    assert [r.text for r in cf.records] == ["a photo of a dog"]
    assert cf.errors[0].row == 2 and "name" in cf.errors[0].reason


def test_parquet_pairs(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": ["a.png", None, "c.png"], "caption": ["one", "two", " "], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "c.parquet")
    cf = read_caption_file(tmp_path / "c.parquet")
    assert [(r.text, r.row, r.image) for r in cf.records] == [("one", 1, (tmp_path / "a.png").resolve())]
    assert [(e.row, e.reason) for e in cf.errors] == [(2, "empty image path"), (3, "empty caption")]
    templated = read_caption_file(tmp_path / "c.parquet", template="#{n}: {caption}")
    assert [r.text for r in templated.records] == ["#1: one", "#3:"]


def test_parquet_missing_column_and_garbage(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match="`CaptionOptions.caption_column`"):
        read_caption_file(tmp_path / "c.parquet")
    _write(tmp_path / "bad.parquet", "not parquet at all")
    with pytest.raises(InputError, match="parquet"):
        read_caption_file(tmp_path / "bad.parquet")


def test_missing_caption_column_message(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.csv", "image,text\na.jpg,hello\n")
    with pytest.raises(InputError) as info:
        read_caption_file(path)
    message = str(info.value)
    for part in (str(path), "'caption'", "image, text", "`CaptionOptions.caption_column`"):
        assert part in message


def test_missing_template_field_message(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.csv", "file,label\na.jpg,dog\n")
    with pytest.raises(InputError) as info:
        read_caption_file(path, template="a photo of a {class_name}")
    message = str(info.value)
    for part in (str(path), "{class_name}", "file, label"):
        assert part in message
    with pytest.raises(InputError, match="positional"):
        read_caption_file(path, template="a photo of a {}")


def test_bad_template_format_spec(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.csv", "caption\ndog\n")
    with pytest.raises(InputError, match="template"):
        read_caption_file(path, template="{caption:d}")


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes("caption\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError) as info:
        read_caption_file(path)
    message = str(info.value)
    assert str(path) in message and "byte 11" in message
    assert "`CaptionOptions.encoding`" in message and "latin-1" in message
    assert read_caption_file(path, encoding="latin-1").records[0].text == "café"


def test_unknown_encoding(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown encoding"):
        read_caption_file(_write(tmp_path / "c.txt", "x"), encoding="no-such-codec")


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        read_caption_file(_write(tmp_path / "c.xml", "<x/>"))
    assert all(ext in str(info.value) for ext in (".txt", ".csv", ".tsv", ".jsonl", ".parquet"))
    with pytest.raises(InputError, match="no such file"):
        read_caption_file(tmp_path / "missing.csv")
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(InputError, match="not a file"):
        read_caption_file(tmp_path / "dir.txt")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("e.txt", ""),
        ("blank.txt", "\n  \n"),
        ("e.csv", ""),
        ("header.csv", "caption\n"),
        ("empty.csv", 'caption\n \n""\n'),
        ("bad.jsonl", "nope\n{\n"),
        ("e.jsonl", ""),
    ],
)
def test_no_usable_rows(tmp_path: Path, name: str, content: str) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(InputError, match="no captions in") as info:
        read_caption_file(path)
    assert str(path) in str(info.value)


@needs_data
def test_coco_captions_jsonl() -> None:
    cf = read_caption_file(COCO / "captions.jsonl")
    assert len(cf.records) == 400 and cf.errors == [] and cf.is_pairs
    images = {r.image for r in cf.records}
    assert len(images) == 80
    assert all(p is not None and p.is_file() and p.parent == (COCO / "images").resolve() for p in images)
    assert cf.records[0].row == 1 and cf.records[-1].row == 400
    assert len({r.id for r in cf.records}) == 400


@needs_data
def test_imagenet_labels_with_template() -> None:
    cf = read_caption_file(IMAGENET / "labels.csv", image_column="file", template="a photo of a {class_name}")
    assert len(cf.records) == 1000 and cf.errors == []
    first = cf.records[0]
    assert first.text == "a photo of a tench" and first.row == 1
    assert first.image == TENCH.resolve() and first.image.is_file()
    assert all(r.image is not None and r.image.is_file() for r in cf.records)


# --------------------------------------------------------------------------- image decoding


@needs_data
def test_load_rgb_jpeg_and_sha256() -> None:
    loaded = load_image(TENCH)
    assert isinstance(loaded, LoadedImage)
    assert loaded.image.mode == "RGB" and loaded.image.size == (loaded.width, loaded.height)
    with Image.open(TENCH) as ref:
        assert (loaded.width, loaded.height) == ref.size
    assert loaded.sha256 == hashlib.sha256(TENCH.read_bytes()).hexdigest()


def test_rgba_png_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (3, 1))
    img.putdata([(0, 0, 0, 0), (200, 10, 10, 255), (0, 0, 0, 128)])
    loaded = load_image(_png(tmp_path / "a.png", img))
    px = _pixels(loaded.image)
    assert loaded.image.mode == "RGB"
    assert px[0] == (255, 255, 255) and px[1] == (200, 10, 10)
    assert all(120 <= c <= 135 for c in px[2])  # half-transparent black over white
    assert loaded.sha256 == hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()


def test_la_png_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("LA", (2, 1))
    img.putdata([(0, 0), (50, 255)])
    px = _pixels(load_image(_png(tmp_path / "la.png", img)).image)
    assert px == [(255, 255, 255), (50, 50, 50)]


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 2))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putdata([0, 1, 1, 0])
    path = _png(tmp_path / "p.png", img, transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    loaded = load_image(path)
    assert _pixels(loaded.image) == [(255, 255, 255), (255, 0, 0), (255, 0, 0), (255, 255, 255)]


def test_palette_without_transparency_and_bilevel(tmp_path: Path) -> None:
    img = Image.new("P", (1, 1))
    img.putpalette([0, 128, 255] + [0] * 765)
    assert load_image(_png(tmp_path / "p.png", img)).image.getpixel((0, 0)) == (0, 128, 255)
    bw = Image.new("1", (2, 1))
    bw.putpixel((1, 0), 1)
    assert _pixels(load_image(_png(tmp_path / "b.png", bw)).image) == [(0, 0, 0), (255, 255, 255)]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    rgb = _real_photo()
    path = tmp_path / "cmyk.jpg"
    rgb.convert("CMYK").save(path, quality=95)  # Pillow writes an Adobe (inverted) CMYK JPEG
    with Image.open(path) as raw:
        assert raw.mode == "CMYK" and "adobe" in raw.info
    loaded = load_image(path)
    assert loaded.image.mode == "RGB" and loaded.image.size == rgb.size
    assert _mean_abs_diff(loaded.image, rgb) < 12


def test_cmyk_tiff(tmp_path: Path) -> None:
    rgb = _real_photo((16, 8))
    path = tmp_path / "cmyk.tif"
    rgb.convert("CMYK").save(path)
    assert _mean_abs_diff(load_image(path).image, rgb) < 3


def test_16bit_greyscale_png_gradient(tmp_path: Path) -> None:
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    path = tmp_path / "g16.png"
    Image.fromarray(gradient).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    out = np.asarray(load_image(path).image)
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out[0, :, 0])) > 200  # spread, not saturated
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)
    assert (out[..., 0] == out[..., 1]).all()


def test_12bit_range_in_16bit_png_is_stretched(tmp_path: Path) -> None:
    gradient = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (2, 1))
    path = tmp_path / "g12.png"
    Image.fromarray(gradient).save(path)
    out = np.asarray(load_image(path).image)[..., 0]
    assert out.min() == 0 and out.max() == 255 and (out == 255).sum() <= 2


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_normalize_high_bit_depth_modes(mode: str) -> None:
    values = np.linspace(1000, 60000, 64).astype(np.uint16).reshape(8, 8)
    if mode == "I":
        img = Image.fromarray(values.astype(np.int32))
    else:
        dtype = ">u2" if mode == "I;16B" else "<u2"
        img = Image.frombytes(mode, (8, 8), values.astype(dtype).tobytes())
    out = np.asarray(normalize_image(img))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 50


def test_normalize_float_and_constant_images() -> None:
    img = Image.fromarray(np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4))
    out = np.asarray(normalize_image(img))
    assert out.min() == 0 and out.max() == 255
    with_nan = np.array([[0.0, np.nan], [0.5, 1.0]], dtype=np.float32)
    assert np.asarray(normalize_image(Image.fromarray(with_nan))).max() == 255
    zero = Image.fromarray(np.zeros((2, 2), np.uint16))
    assert np.asarray(normalize_image(zero)).max() == 0
    full = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert np.asarray(normalize_image(full)).min() == 255


ALL_MODES = ["RGB", "L", "RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "HSV", "RGBX", "La", "RGBa", "1", "F", "I"]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_normalize_any_mode_gives_rgb(mode: str) -> None:
    out = normalize_image(Image.new(mode, (3, 2)))
    assert out.mode == "RGB" and out.size == (3, 2)


def test_exif_rotated_jpeg(tmp_path: Path) -> None:
    original = _real_photo((96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    original.save(path, quality=95, exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (96, 64)
    loaded = load_image(path)
    assert (loaded.width, loaded.height) == (64, 96) == loaded.image.size
    expected = original.transpose(Image.Transpose.ROTATE_270)
    assert _mean_abs_diff(loaded.image, expected) < 6
    assert _mean_abs_diff(loaded.image, original.transpose(Image.Transpose.ROTATE_90)) > 20


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    assert load_image(path).image.getpixel((1, 1)) == (255, 0, 0)
    with Image.open(path) as raw:
        raw.seek(2)
        assert normalize_image(raw).getpixel((1, 1)) == (255, 0, 0)


@needs_data
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images(tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    _real_photo((128, 96)).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"t.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert info.value.path == str(path)
    assert "truncated" in info.value.reason or "corrupt" in info.value.reason


def test_corrupt_png_data(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    (tmp_path / "c.png").write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError, match="corrupt|truncated"):
        load_image(tmp_path / "c.png")


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b"hello, I am text\n", "cannot identify image file"),
        (b"", "empty file"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, "corrupt|cannot identify|truncated"),
    ],
    ids=["text", "zero-bytes", "png-magic-only"],
)
def test_not_images(tmp_path: Path, content: bytes, expect: str) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=expect):
        load_image(path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageDecodeError, match="directory"):
        load_image(tmp_path)
    path = _tiny(tmp_path / "locked.png")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(ImageDecodeError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


def test_permission_error_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _tiny(tmp_path / "x.png")

    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(ImageDecodeError, match="permission denied") as info:
        load_image(path)
    assert info.value.path == str(path)


def _bomb_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    return _patch_png_size(buf.getvalue(), width, height)


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 10_000)])
def test_decompression_bomb_png(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_bytes(*size))
    # Pillow itself warns between its limit and twice it (and raises above): the library leaves that warning to
    # the caller
    pillow_warns = Image.MAX_IMAGE_PIXELS < size[0] * size[1] <= 2 * Image.MAX_IMAGE_PIXELS
    with (
        pytest.warns(Image.DecompressionBombWarning) if pillow_warns else contextlib.nullcontext(),
        pytest.raises(ImageDecodeError, match="decompression bomb"),
    ):
        load_image(path, max_pixels=50_000_000)


def test_max_pixels_on_normal_image(tmp_path: Path) -> None:
    path = _png(tmp_path / "n.png", Image.new("RGB", (40, 30)))
    with pytest.raises(ImageDecodeError, match=r"decompression bomb: declared size 40x30 = 1200 pixels"):
        load_image(path, max_pixels=1000)
    assert load_image(path, max_pixels=1200).width == 40


def test_load_image_leaves_pillow_globals_alone(tmp_path: Path) -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_bytes(100_000, 100_000))
    with pytest.raises(ImageDecodeError):
        load_image(path)
    load_image(_tiny(tmp_path / "ok.png"))
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)) == before


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_mutated_files_only_raise_image_decode_error(tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    _real_photo((32, 24)).save(buf, fmt)
    data = buf.getvalue()
    rng = random.Random(fmt)
    path = tmp_path / f"m.{fmt.lower()}"
    for _ in range(40):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            mutated[rng.randrange(min(len(mutated), 200))] = rng.randrange(256)
        cut = rng.choice([len(mutated), rng.randrange(1, len(mutated))])
        path.write_bytes(bytes(mutated[:cut]))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # Pillow's warnings must not escape either
                loaded = load_image(path, max_pixels=4_000_000)
        except ImageDecodeError as exc:
            assert exc.reason
        else:
            assert loaded.image.mode == "RGB"


# --------------------------------------------------------------------------- undecodable rows


def _bom_crlf_csv(tmp_path: Path, bad_at: int, rows: int = 4) -> tuple[Path, int]:
    """A UTF-8 CSV (BOM, CRLF) whose data row number ``bad_at`` is Latin-1; returns the bad byte's offset."""
    data = codecs.BOM_UTF8 + b"caption\r\n"
    offset = -1
    for number in range(1, rows + 1):
        if number == bad_at:
            offset = len(data) + len("caf")
            data += "café au lait\r\n".encode("latin-1")
        else:
            data += f"row {number} ünïcode\r\n".encode()
    path = tmp_path / "captions.csv"
    path.write_bytes(data)
    return path, offset


def test_one_undecodable_csv_row_is_skipped_and_reported(tmp_path: Path) -> None:
    path, offset = _bom_crlf_csv(tmp_path, bad_at=3)
    cf = read_caption_file(path)
    assert [(r.row, r.text) for r in cf.records] == [(1, "row 1 ünïcode"), (2, "row 2 ünïcode"), (4, "row 4 ünïcode")]
    [error] = cf.errors
    assert (error.row, error.line, error.byte, error.kind) == (3, 4, offset, "caption")
    assert f"cannot decode as utf-8 at byte {offset}" in error.reason
    assert error.to_json()["byte"] == offset and error.to_json()["line"] == 4


def test_undecodable_txt_and_jsonl_lines_are_skipped(tmp_path: Path) -> None:
    lines = [f"caption {i}".encode() for i in range(300)]
    lines[150] = "caf\xe9".encode("latin-1")
    txt = tmp_path / "c.txt"
    txt.write_bytes(b"\n".join(lines) + b"\n")
    cf = read_caption_file(txt)
    assert len(cf.records) == 299 and [(e.row, e.line, e.byte) for e in cf.errors] == [
        (151, 151, txt.read_bytes().index(b"\xe9"))
    ]
    rows = [json.dumps({"caption": f"c {i}"}).encode() for i in range(300)]
    rows[7] = b'{"caption": "caf\xe9"}'
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(b"\n".join(rows))
    cf = read_caption_file(jsonl)
    assert len(cf.records) == 299 and [(e.row, e.byte) for e in cf.errors] == [(8, jsonl.read_bytes().index(b"\xe9"))]


def test_file_evidently_in_another_encoding_is_refused(tmp_path: Path) -> None:
    path, offset = _bom_crlf_csv(tmp_path, bad_at=1)  # the first row fails
    with pytest.raises(InputError, match=f"cannot decode as utf-8 at byte {offset}.*`CaptionOptions.encoding`"):
        read_caption_file(path)
    many = tmp_path / "many.txt"  # 2 of 100 lines (> 1%) fail
    lines = [f"caption {i}".encode() for i in range(100)]
    lines[40] = lines[60] = "caf\xe9".encode("latin-1")
    many.write_bytes(b"\n".join(lines))
    with pytest.raises(InputError, match="2 of 100 lines fail"):
        read_caption_file(many)
    lines[60] = b"fine"  # 1 of 100: skipped
    many.write_bytes(b"\n".join(lines))
    assert len(read_caption_file(many).errors) == 1


def test_utf16_caption_file_still_fails_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xff\xfea\x00\x00\xd8")  # UTF-16-LE with a lone high surrogate
    with pytest.raises(InputError, match="cannot decode as utf-16"):
        read_caption_file(path, encoding="utf-16")
