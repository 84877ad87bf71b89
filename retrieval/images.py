"""Robust image decoding: any mode Pillow reads becomes an upright RGB image, or an ImageDecodeError.

Nothing here touches global state: Pillow's limits are passed explicitly and
warnings are only filtered inside ``warnings.catch_warnings`` blocks.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError

logger = logging.getLogger(__name__)

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
    return (f"decompression bomb: declared size {width}x{height} = {width * height} pixels "
            f"exceeds max_pixels {max_pixels}")


def _open_image(data: bytes, path: Path, max_pixels: int) -> Image.Image:
    """Open and fully decode ``data``; every Pillow failure becomes ImageDecodeError."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image (cannot identify image file)") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(path, f"decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow raises SyntaxError/ValueError/struct.error on bad headers
        raise ImageDecodeError(path, f"corrupt image header: {_describe(exc)}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(path, _bomb_reason(width, height, max_pixels))
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(path, f"decompression bomb: {exc}") from None
    except Exception as exc:
        raise ImageDecodeError(path, _load_failure(exc)) from None
    return img


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load_failure(exc: BaseException) -> str:
    """Short reason for a failure while decoding pixel data."""
    text = _describe(exc)
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated image data ({text})"
    return f"corrupt image data ({text})"


def load_image(path: str | Path, max_pixels: int = _DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read, hash, decode and normalise one image file."""
    file = Path(path)
    try:
        str(file).encode("utf-8")
    except UnicodeEncodeError:
        # bytes that are not UTF-8 in the name: the path cannot be stored in the index or shown reliably
        raise ImageDecodeError(file, "file name is not valid UTF-8; rename the file to index it") from None
    data = _read_bytes(file)
    if not data:
        raise ImageDecodeError(file, "empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    # Pillow reports oddities (corrupt EXIF, bomb-size hints) as warnings; keep them
    # local and log them instead of letting them reach the user's warning filters.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = _open_image(data, file, max_pixels)
        try:
            rgb = normalize_image(img)
        except Exception as exc:
            reason = f"cannot convert {img.mode} image to RGB: {_describe(exc)}"
            raise ImageDecodeError(file, reason) from None
    for warning in caught:
        logger.debug("%s: %s", file, warning.message)
    return LoadedImage(image=rgb, width=rgb.width, height=rgb.height, sha256=digest)
