"""Robust image decoding: any mode Pillow reads becomes an upright RGB image, or an ImageDecodeError.

Nothing here touches global state: Pillow's limits are passed explicitly and the
warnings filters are left alone (``warnings.catch_warnings`` is process-wide and not
thread-safe, and images are decoded on many threads at once). Pillow's own warnings
about odd files (corrupt EXIF, a malformed MPO) therefore reach the caller's filters
like any library's; under an ``error`` filter they become the ImageDecodeError of
that file (a decompression-bomb warning one that says so).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from retrieval.core.errors import ImageDecodeError

_DEFAULT_MAX_PIXELS = 178_956_970


@dataclass
class LoadedImage:
    """A decoded RGB image with its size and the hash of the file bytes."""

    image: Image.Image
    width: int
    height: int
    sha256: str


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    """Flatten an RGBA image onto a white background."""
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _nominal_max(mode: str, hi: float) -> float:
    """Full-scale value for a constant high-bit-depth image."""
    if mode == "F":
        return 1.0 if hi <= 1.0 else 255.0
    if mode.startswith("I;16"):
        return 65535.0
    return 255.0 if hi <= 255 else 65535.0 if hi <= 65535 else float(2**31 - 1)


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float greyscale image to 8-bit using its real value range."""
    data = np.asarray(img).astype(np.float64)
    finite = data[np.isfinite(data)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    data = np.where(np.isfinite(data), data, lo)
    if hi > lo:
        scaled = (data - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.full_like(data, 255.0 * max(lo, 0.0) / _nominal_max(img.mode, hi))
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def normalize_image(img: Image.Image) -> Image.Image:
    """First frame, EXIF orientation applied, converted to 8-bit RGB (transparency on white)."""
    if getattr(img, "is_animated", False) and img.tell() != 0:
        img.seek(0)
    orientation = img.getexif().get(0x0112, 1)
    if orientation in range(2, 9):
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode == "F" or mode.startswith("I"):
        return _scale_to_8bit(img)
    if _has_transparency(img):
        if mode == "La":
            img = img.convert("LA")
        return _composite_on_white(img.convert("RGBA"))
    return img.convert("RGB")


def _read_bytes(path: Path) -> bytes:
    """File bytes, or ImageDecodeError naming why they cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied") from None
    except IsADirectoryError:
        raise ImageDecodeError(path, "is a directory") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read file: {exc.strerror or exc}") from None


def _bomb_reason(width: int, height: int, max_pixels: int) -> str:
    return (
        f"decompression bomb: declared size {width}x{height} = {width * height} pixels exceeds max_pixels {max_pixels}"
    )


def _open_image(
    data: bytes, path: str | Path, max_pixels: int, draft_size: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int, int] | None]:
    """Open and fully decode ``data``; every Pillow failure becomes ImageDecodeError.

    With ``draft_size`` a JPEG at least twice that size is decoded at a reduced scale (see
    :func:`_apply_draft`); the second value is then (stored width, stored height, scale), else None.
    """
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image (cannot identify image file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # a warning under an "error" filter
        raise ImageDecodeError(path, f"decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow raises SyntaxError/ValueError/struct.error on bad headers
        raise ImageDecodeError(path, f"corrupt image header: {_describe(exc)}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(path, _bomb_reason(width, height, max_pixels))
    drafted = None
    if draft_size is not None:
        try:
            drafted = _apply_draft(img, draft_size)
        except Exception:  # only an optimisation: decode in full and let that path report problems
            drafted = None
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(path, f"decompression bomb: {exc}") from None
    except Exception as exc:
        raise ImageDecodeError(path, _load_failure(exc)) from None
    return img, drafted


_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# EXIF orientation -> (upright x axis runs backwards in the file, upright y axis does)
_REVERSED_AXES = {
    1: (False, False),
    2: (True, False),
    3: (True, True),
    4: (False, True),
    5: (False, False),
    6: (True, False),
    7: (True, True),
    8: (False, True),
}

DRAFT_INFO = "retrieval.draft"
"""``LoadedImage.image.info`` key set when a JPEG was decoded at reduced scale: a tuple
``(full_width, full_height, scale, offset_x, offset_y)`` of the upright image, where pixel ``u``
of the decoded image covers full-resolution ``[offset + scale * u, offset + scale * (u + 1))``
(the offset is <= 0, non-zero where EXIF orientation mirrors the partial last JPEG block to the
start). ``retrieval.encoders.preprocess`` uses it to crop exactly the region a full decode would."""


def _check_draft_size(draft_size: tuple[int, int]) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in draft_size)
    except (TypeError, ValueError):
        raise ValueError(f"draft_size must be a (width, height) pair, got {draft_size!r}") from None
    if width < 1 or height < 1:
        raise ValueError(f"draft_size must be positive, got {draft_size!r}")
    return width, height


def _apply_draft(img: Image.Image, draft_size: tuple[int, int]) -> tuple[int, int, int] | None:
    """Ask a large JPEG to decode at 1/2, 1/4 or 1/8 scale, keeping each side >= ``draft_size``.

    ``draft_size`` is (width, height) of the upright image; the JPEG is stored before EXIF
    orientation, so for orientations that transpose the request is swapped. Pillow picks the
    largest scale ``s`` with ``s * need <= size`` on both sides and rounds the scaled size up,
    so the decoded image is never smaller than asked. Returns (stored width, stored height,
    scale) when the decode scale changed, else None.
    """
    if img.format not in ("JPEG", "MPO") or len(getattr(img, "tile", ())) != 1:
        return None  # MPO: a JPEG whose first frame is the one decoded
    need_w, need_h = draft_size
    if img.getexif().get(0x0112, 1) in _TRANSPOSING_ORIENTATIONS:
        need_w, need_h = need_h, need_w
    full = img.size
    if full[0] < 2 * need_w or full[1] < 2 * need_h:
        return None  # no scale of 1/2 or less keeps the needed size
    result = img.draft("RGB", (need_w, need_h))
    if result is None or img.size == full:
        return None
    scale = round(full[0] / result[1][2])  # Pillow's box: (0, 0, width / scale, height / scale)
    return (full[0], full[1], scale)


def _draft_geometry(rgb: Image.Image, drafted: tuple[int, int, int], orientation: int) -> tuple[int, int]:
    """Full-resolution upright (width, height) of a drafted image; stores DRAFT_INFO on ``rgb``."""
    stored_w, stored_h, scale = drafted
    width, height = (stored_h, stored_w) if orientation in _TRANSPOSING_ORIENTATIONS else (stored_w, stored_h)
    n_x, n_y = rgb.size
    if n_x != -(-width // scale) or n_y != -(-height // scale):  # not the libjpeg geometry: leave no hint
        return width, height
    reverse_x, reverse_y = _REVERSED_AXES.get(orientation, (False, False))
    offset_x = width - scale * n_x if reverse_x else 0
    offset_y = height - scale * n_y if reverse_y else 0
    rgb.info[DRAFT_INFO] = (width, height, scale, offset_x, offset_y)
    return width, height


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load_failure(exc: BaseException) -> str:
    """Short reason for a failure while decoding pixel data."""
    text = _describe(exc)
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated image data ({text})"
    return f"corrupt image data ({text})"


def load_image(
    path: str | Path,
    max_pixels: int = _DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> LoadedImage:
    """Read, hash, decode and normalise one image file.

    ``draft_size`` (width, height), e.g. an encoder's ``draft_size``: the smallest upright size
    the caller needs. A JPEG at least twice as large on both sides is then decoded at a reduced
    scale (1/2, 1/4 or 1/8, libjpeg's DCT scaling) that still covers it; ``image`` is that smaller
    picture, while ``width``/``height`` stay the full-resolution upright size and ``sha256`` the
    hash of the file bytes; ``image.info[DRAFT_INFO]`` records how the two relate. Other
    formats, and JPEGs that are not that large, decode in full.
    """
    if draft_size is not None:
        draft_size = _check_draft_size(draft_size)
    file = Path(path)
    try:
        str(file).encode("utf-8")
    except UnicodeEncodeError:
        # bytes that are not UTF-8 in the name: the path cannot be stored in the index or shown reliably
        raise ImageDecodeError(file, "file name is not valid UTF-8; rename the file to index it") from None
    return decode_image(_read_bytes(file), file, max_pixels, draft_size)


def decode_image(
    data: bytes,
    name: str | Path,
    max_pixels: int = _DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> LoadedImage:
    """Hash, decode and normalise an image's bytes, wherever they came from (a file, a tar
    member, a parquet cell); ``name`` names the item in errors. See :func:`load_image`."""
    if draft_size is not None:
        draft_size = _check_draft_size(draft_size)
    if not data:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    img, drafted = _open_image(data, name, max_pixels, draft_size)
    try:
        orientation = img.getexif().get(0x0112, 1) if drafted is not None else 1
        rgb = normalize_image(img)
    except Exception as exc:
        reason = f"cannot convert {img.mode} image to RGB: {_describe(exc)}"
        raise ImageDecodeError(name, reason) from None
    width, height = rgb.width, rgb.height
    if drafted is not None:  # report the full-resolution upright size, and record the geometry
        width, height = _draft_geometry(rgb, drafted, orientation)
    return LoadedImage(image=rgb, width=width, height=height, sha256=digest)
