"""A corpus of hostile inputs, generated in a temporary folder from the real photos.

``make_image_corpus(root)`` writes odd, broken and dangerous image files under
``root`` and returns one :class:`ImageCase` per file saying what a build must do
with it; ``make_caption_corpus(root)`` does the same for caption files, and
``WHOLE_FILE_CASES`` lists caption files that must stop a build with one clear
error. Nothing is copied into the repository; every file is small, so a build
over the whole corpus with the tiny CLIP model takes a few seconds.
"""

from __future__ import annotations

import faulthandler
import io
import json
import os
import signal
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conftest import COCO, coco_pairs
from PIL import Image

PHOTO_SIZE = (96, 64)  # small, and not square: a missed 90 degree turn changes the size
LONG_CAPTION = ("a dog runs on the beach near the sea " * 3000)[:100_000]


@dataclass(frozen=True)
class ImageCase:
    """One file of the image corpus and what a build must do with it."""

    name: str  # file name under the corpus folder (may hold a lone surrogate: undecodable bytes)
    hostile: str  # what is odd about it
    outcome: str  # indexed | skipped (row in errors.jsonl) | deduped
    reason: str = ""  # regex the errors.jsonl reason must match, for skipped files
    upright: str | None = None  # name of a file whose decoded pixels this one must reproduce
    tolerance: float = 0.0  # mean absolute pixel difference allowed against ``upright``
    size: tuple[int, int] | None = None  # decoded (width, height), when it is not PHOTO_SIZE


@dataclass(frozen=True)
class CaptionCase:
    """One caption file and the captions / skipped rows a build must produce from it."""

    name: str
    hostile: str
    captions: tuple[str, ...]  # indexed, exactly these texts, in this order
    errors: tuple[tuple[int, str], ...] = ()  # (row, reason regex) rows in errors.jsonl
    image_errors: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (file name, reason) of paired images


@dataclass(frozen=True)
class WholeFileCase:
    """A caption file that must stop the build with one InputError naming it."""

    name: str
    hostile: str
    data: bytes
    message: str  # regex the error must match
    encoding: str = "utf-8"


def upright_photo() -> Image.Image:
    """A real COCO photo, small, in 8-bit RGB."""
    return Image.open(COCO / coco_pairs(1)[0]["image"]).convert("RGB").resize(PHOTO_SIZE, Image.Resampling.BICUBIC)


def other_photo() -> Image.Image:
    return Image.open(COCO / coco_pairs(2)[-1]["image"]).convert("RGB").resize(PHOTO_SIZE, Image.Resampling.BICUBIC)


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def rgb48_png(image: Image.Image) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one), written by hand."""
    pixels = np.asarray(image, dtype=np.uint16) * 257
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", image.width, image.height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` (CRC fixed, so only the size is a lie)."""
    data = bytearray(encoded(Image.new("L", (8, 8)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_bomb(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose SOF marker claims ``width`` x ``height``."""
    data = bytearray(jpeg)
    at = 2
    while at < len(data):
        marker, length = data[at + 1], struct.unpack(">H", data[at + 2 : at + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[at + 5 : at + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        at += 2 + length
    raise AssertionError("no SOF marker")


def ycck_jpeg(image: Image.Image) -> bytes:
    """A real YCCK JPEG (Adobe APP14 transform=2) that decodes back to ``image``.

    Pillow writes 4-channel JPEGs untransformed; store YCbCr(255-C, 255-M, 255-Y) and K in the four
    channels and flip the Adobe transform flag, as Photoshop does.
    """
    cmyk = np.asarray(image.convert("CMYK"), dtype=np.float64)
    r, g, b, k = 255 - cmyk[..., 0], 255 - cmyk[..., 1], 255 - cmyk[..., 2], cmyk[..., 3]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    planes = np.clip(np.rint(np.stack([y, cb, cr, k], axis=-1)), 0, 255).astype(np.uint8)
    data = bytearray(encoded(Image.fromarray(planes, "CMYK"), "JPEG", quality=95))
    adobe = data.find(b"Adobe")
    assert adobe > 0 and data[adobe + 11] == 0, "Pillow's CMYK JPEG has no Adobe APP14 marker"
    data[adobe + 11] = 2  # transform: YCCK
    return bytes(data)


# stored image -> what ImageOps.exif_transpose does for each EXIF orientation; we store the inverse
_ORIENTATION_STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def exif_rotated(image: Image.Image, orientation: int, fmt: str, **options: object) -> bytes:
    """``image`` stored turned/mirrored, with the EXIF orientation that undoes it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image.transpose(_ORIENTATION_STORE[orientation]), fmt, exif=exif, **options)


def write(root: Path, name: str, data: bytes) -> Path:
    path = root / name
    with open(os.fsencode(path), "wb") as handle:
        handle.write(data)
    return path


def make_image_corpus(root: Path) -> list[ImageCase]:
    """Write the image corpus under ``root`` and return what must happen to each file."""
    root.mkdir(parents=True, exist_ok=True)
    photo = upright_photo()
    plain_jpg = encoded(photo, "JPEG", quality=95)
    plain_png = encoded(photo, "PNG")
    cases: list[ImageCase] = []

    def add(name: str, data: bytes | None, *args: object, **kwargs: object) -> None:
        if data is not None:
            write(root, name, data)
        cases.append(ImageCase(name, *args, **kwargs))  # type: ignore[arg-type]

    add("plain.jpg", plain_jpg, "the reference photo", "indexed")
    add("plain.png", plain_png, "the reference photo, lossless", "indexed")
    add("zero-bytes.jpg", b"", "zero-byte file", "skipped", r"^empty file \(0 bytes\)$")
    add("truncated.jpg", plain_jpg[: len(plain_jpg) // 2], "JPEG cut in half", "skipped", r"^truncated image data")
    add(
        "truncated.png",
        plain_png[: len(plain_png) * 2 // 3],
        "PNG cut at two thirds",
        "skipped",
        r"truncated|corrupt image data",
    )
    add("header-only.png", plain_png[:40], "PNG with nothing after IHDR", "skipped", r"^not an image|truncated|corrupt")
    add("text.jpg", b"this is not a photo\n" * 20, "a text file named .jpg", "skipped", r"^not an image")
    add(
        "html.png",
        b"<html><body>404 Not Found</body></html>",
        "an HTML error page saved as .png",
        "skipped",
        r"^not an image",
    )
    add("png-named.jpg", plain_png, "PNG bytes behind a .jpg name", "indexed", upright="plain.png")
    add(
        "cmyk.jpg",
        encoded(photo.convert("CMYK"), "JPEG", quality=95),
        "CMYK JPEG (Adobe APP14, no transform)",
        "indexed",
        upright="plain.png",
        tolerance=6,
    )
    add(
        "ycck.jpg", ycck_jpeg(photo), "YCCK JPEG (Adobe APP14 transform=2)", "indexed", upright="plain.png", tolerance=6
    )
    add("grey.jpg", encoded(photo.convert("L"), "JPEG", quality=95), "greyscale JPEG", "indexed")
    grey16 = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    add("grey16.png", encoded(Image.fromarray(grey16), "PNG"), "16-bit greyscale PNG", "indexed")
    add("rgb48.png", rgb48_png(photo), "16-bit-per-channel RGB PNG", "indexed", upright="plain.png", tolerance=1)
    add(
        "palette.png",
        encoded(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "palette PNG",
        "indexed",
        upright="plain.png",
        tolerance=12,
    )
    transparent = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    add(
        "palette-transparent.png",
        encoded(transparent, "PNG", transparency=0),
        "palette PNG with a transparent index",
        "indexed",
    )
    rgba = photo.convert("RGBA")
    add("rgba-opaque.png", encoded(rgba, "PNG"), "RGBA PNG, fully opaque", "indexed", upright="plain.png")
    half = np.asarray(rgba).copy()
    half[:, : PHOTO_SIZE[0] // 2, 3] = 0
    add("rgba-half.png", encoded(Image.fromarray(half, "RGBA"), "PNG"), "RGBA PNG, left half transparent", "indexed")
    frames = [photo, other_photo(), photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    add(
        "animated.gif",
        encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        "animated GIF, 3 frames",
        "indexed",
    )
    for orientation in range(2, 9):
        add(
            f"exif-{orientation}.jpg",
            exif_rotated(photo, orientation, "JPEG", quality=95),
            f"EXIF orientation {orientation}",
            "indexed",
            upright="plain.png",
            tolerance=6,
        )
    add(
        "exif-6.png",
        exif_rotated(photo, 6, "PNG"),
        "EXIF orientation 6 in a PNG eXIf chunk",
        "indexed",
        upright="plain.png",
    )
    add(
        "exif-8.webp",
        exif_rotated(photo, 8, "WEBP", lossless=True),
        "EXIF orientation 8 in a lossless WebP",
        "indexed",
        upright="plain.png",
    )
    bad_exif = Image.Exif()
    bad_exif[0x0112] = 9  # not an orientation
    add(
        "exif-invalid.jpg",
        encoded(photo, "JPEG", quality=95, exif=bad_exif),
        "EXIF orientation 9 (invalid)",
        "indexed",
        upright="plain.jpg",
    )
    add(
        "bomb.png",
        png_bomb(100_000, 100_000),
        "PNG declaring 100000x100000 (10 gigapixels)",
        "skipped",
        r"^decompression bomb",
    )
    add(
        "bomb.jpg",
        jpeg_bomb(plain_jpg, 60_000, 60_000),
        "JPEG declaring 60000x60000",
        "skipped",
        r"^decompression bomb",
    )
    add("one-pixel.png", encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), "1x1 image", "indexed", size=(1, 1))
    add("sliver.png", encoded(photo.resize((2000, 1)), "PNG"), "2000x1 image", "indexed", size=(2000, 1))
    add("photo.webp", encoded(photo, "WEBP", lossless=True), "lossless WebP", "indexed", upright="plain.png")
    add("photo.tiff", encoded(photo, "TIFF"), "TIFF", "indexed", upright="plain.png")
    add(
        "float.tif",
        encoded(Image.fromarray(np.asarray(photo.convert("L"), np.float32) / 255.0, "F"), "TIFF"),
        "32-bit float TIFF",
        "indexed",
    )
    add("photo.bmp", encoded(photo, "BMP"), "BMP", "indexed", upright="plain.png")
    bad_crc = bytearray(plain_png)
    bad_crc[29] ^= 0xFF
    add("bad-crc.png", bytes(bad_crc), "PNG with a broken IHDR CRC", "skipped", r"^not an image|corrupt")
    add("café 写真 ünïcode.jpg", plain_jpg, "unicode file name", "indexed", upright="plain.jpg")
    add("with  spaces .jpg", plain_jpg, "spaces in the file name", "indexed", upright="plain.jpg")
    add("new\nline.jpg", plain_jpg, "a newline in the file name", "indexed", upright="plain.jpg")
    add("broken\nname.jpg", b"", "a newline in the name of a broken file", "skipped", r"^empty file")
    add(
        os.fsdecode(b"latin1-\xe9t\xe9.jpg"),
        plain_jpg,
        "file name bytes that are not UTF-8",
        "skipped",
        r"file name is not valid UTF-8",
    )
    add("locked.jpg", plain_jpg, "unreadable (permission denied, simulated)", "skipped", r"^permission denied$")
    add("dup-a.jpg", plain_jpg, "two files with the same bytes (1/2)", "indexed", upright="plain.jpg")
    add("dup-b.jpg", plain_jpg, "two files with the same bytes (2/2)", "indexed", upright="plain.jpg")
    (root / "alias.jpg").symlink_to(root / "dup-a.jpg")
    add("alias.jpg", None, "a symlink to another file of the corpus", "deduped")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    add("loop.jpg", None, "a symlink to itself", "skipped", r"cannot resolve the path|broken or looping link")
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    add("dangling.jpg", None, "a symlink to nothing", "skipped", r"not a regular file \(broken or looping link\?\)")
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # a directory loop: sub/up/sub/up/...
    write(root / "sub", "nested.png", plain_png)
    add("sub/nested.png", None, "a photo next to a directory symlink loop", "indexed", upright="plain.png")
    return cases


def make_caption_corpus(root: Path, images: Path) -> list[CaptionCase]:
    """Write caption files under ``root`` (pairs refer to ``images``) and return what each must yield."""
    root.mkdir(parents=True, exist_ok=True)
    cases: list[CaptionCase] = []

    def add(name: str, data: bytes, *args: object, **kwargs: object) -> None:
        (root / name).write_bytes(data)
        cases.append(CaptionCase(name, *args, **kwargs))  # type: ignore[arg-type]

    add("bom.txt", b"\xef\xbb\xbfa cat on a sofa\nsecond line\n", "UTF-8 BOM", ("a cat on a sofa", "second line"))
    add(
        "crlf.txt",
        b"a red bus\r\n\r\n   \r\na green tram\r\n",
        "CRLF line ends and blank lines",
        ("a red bus", "a green tram"),
    )
    add("mac.txt", b"old mac line one\rold mac line two", "bare CR line ends", ("old mac line one", "old mac line two"))
    add("long.txt", (LONG_CAPTION + "\n").encode(), "one 100,000-character caption", (LONG_CAPTION.strip(),))
    csv_text = (
        "\ufeffcaption,source\r\n"
        '"a caption with\na quoted newline",web\r\n'
        '"commas, ""quotes"" and more",web\r\n'
        "\r\n"
        "short row\r\n"
        ",empty caption\r\n"
        "extra columns,a,b,c\r\n"
    )
    add(
        "quoted.csv",
        csv_text.encode(),
        "BOM header, CRLF, quoted newline, blank line, missing and extra columns",
        ("a caption with\na quoted newline", 'commas, "quotes" and more', "short row", "extra columns"),
        errors=((4, r"^empty caption$"),),
    )
    jsonl = [
        json.dumps({"caption": "a plate of food"}),
        '{"caption": "unterminated',
        json.dumps({"caption": "extra keys", "x": [1, 2], "y": {"z": None}}),
        "",
        json.dumps(["not", "an", "object"]),
        json.dumps({"caption": None}),
        json.dumps({"caption": ["a", "list"]}),
        json.dumps({"caption": 42}),
        json.dumps({"caption": "emoji 🐕‍🦺, RTL שלום, zero\u200bwidth, NUL \u0000 inside"}),
        '{"caption": "lone surrogate \\ud800 here"}',
        json.dumps({"text": "the caption column is missing"}),
        json.dumps({"caption": "the last good line"}),
    ]
    add(
        "mixed.jsonl",
        ("\n".join(jsonl) + "\n").encode(),
        "bad JSON in the middle, wrong types, missing key",
        (
            "a plate of food",
            "extra keys",
            "42",
            "emoji 🐕‍🦺, RTL שלום, zero\u200bwidth, NUL \u0000 inside",
            "the last good line",
        ),
        errors=(
            (2, r"^invalid JSON"),
            (5, r"^expected a JSON object"),
            (6, r"^empty caption$"),
            (7, r"^caption is not text"),
            (10, r"not valid Unicode"),
            (11, r"^empty caption$"),
        ),
    )
    rel = os.path.relpath(images, root)
    pairs = (
        "image\tcaption\n"
        f"{rel}/one-pixel.png\ta single red pixel\n"
        f"{rel}/no-such-photo.jpg\ta photo that is not there\n"
        f"{rel}/zero-bytes.jpg\tan empty file\n"
    )
    add(
        "pairs.tsv",
        pairs.encode(),
        "pairs naming a missing and a broken image",
        ("a single red pixel", "a photo that is not there", "an empty file"),
        image_errors=(("no-such-photo.jpg", r"^file not found$"), ("zero-bytes.jpg", r"^empty file")),
    )
    return cases


WHOLE_FILE_CASES = [
    WholeFileCase(
        "latin1.txt",
        "Latin-1 bytes, read as UTF-8",
        "café crème\nnaïve façade\n".encode("latin-1"),
        r"latin1\.txt: cannot decode as utf-8 at byte 3 .*`CaptionOptions\.encoding`",
    ),
    WholeFileCase(
        "no-column.csv",
        "no caption column",
        b"text,label\nhello,x\n",
        r"no-column\.csv: no caption column 'caption'; available columns: text, label",
    ),
    WholeFileCase("empty.jsonl", "empty file", b"", r"empty\.jsonl.*\(file is empty\)"),
    WholeFileCase("blank.txt", "only blank lines", b"\n \n\t\n", r"blank\.txt"),
    WholeFileCase("all-bad.jsonl", "no line is valid", b"{oops\n[1]\n", r"no captions in .*all-bad\.jsonl"),
    WholeFileCase(
        "huge-field.csv",
        "a 200,000-character CSV field (over the csv module's limit)",
        b"caption\n" + b"x" * 200_000 + b"\n",
        r"huge-field\.csv: malformed CSV",
    ),
    WholeFileCase("unknown.txt", "an encoding name that does not exist", b"hello\n", r"unknown encoding", "klingon"),
]


@contextmanager
def time_limit(seconds: int, what: str = "this step", dump_threads: bool = False) -> Iterator[None]:
    """Fail with TimeoutError instead of hanging (main thread only); ``dump_threads``: print every
    thread's traceback first (a deadlock elsewhere, e.g. in a Ray actor pool)."""

    def expired(signum: int, frame: object) -> None:
        if dump_threads:
            faulthandler.dump_traceback(all_threads=True)
        raise TimeoutError(f"{what} did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
