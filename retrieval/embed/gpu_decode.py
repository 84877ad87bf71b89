"""JPEG decoding in batches on the encoder's device (nvJPEG on a GPU), with a CPU fallback per image.

With ``--decode gpu`` (or ``auto`` on a CUDA encoder) the DataLoader workers only read each
file, hash it and look at its header (:func:`gpu_jpeg_size`); a plain JPEG leaves the worker
as its bytes. The main process decodes a batch's JPEGs at once with
``torchvision.io.decode_jpeg(list, device=...)`` and resizes, crops and normalises them there
(:meth:`retrieval.encoders.preprocess.FastImageTransform.transform_tensor`). Everything else
takes the CPU path of today, for that image alone: another format, a CMYK / YCCK / greyscale
JPEG, an EXIF orientation that rotates or mirrors (2-8), a file that does not end in the JPEG end marker
(truncated), an image over :data:`GPU_MAX_PIXELS`, any file the header probe cannot read, and
any JPEG the batched decode refuses. The worker runs the CPU path itself for the images it
turns away, the main process for those the device refuses, so the result and the error
report (the ``errors.jsonl`` row) are the CPU path's own.

The same code runs with ``device="cpu"`` (torchvision's libjpeg decode), which is how the tests
check on a machine without a GPU that the vectors match the PIL path.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from retrieval.core.errors import InputError
from retrieval.sources.readahead import readahead

__all__ = [
    "DECODE_CHOICES",
    "GPU_MAX_PIXELS",
    "DeviceDecoder",
    "JpegBytesDataset",
    "collate_jpegs",
    "decode_device",
    "gpu_jpeg_size",
]

DECODE_CHOICES = ("auto", "cpu", "gpu")
# Larger JPEGs decode on the CPU at reduced DCT scale (load_image's draft), which is cheaper than
# a full-size decode; 16 MP still takes a 12 MP phone photo (4000x3000) to the device.
GPU_MAX_PIXELS = 16_000_000
_EOI = b"\xff\xd9"  # JPEG end-of-image marker

Sample = tuple  # (position, pixels | jpeg bytes | None, width, height, sha256, reason | None)


def decode_device(choice: str, device: str, transform: Any) -> str | None:
    """Where JPEGs are decoded: the encoder's device for the batched path, or None for the CPU path.

    ``choice``: 'cpu' (PIL in the workers), 'gpu' (the encoder's CUDA device; an error elsewhere),
    'auto' ('gpu' when the encoder runs on CUDA and the device decodes JPEGs, else 'cpu').
    """
    from retrieval.encoders.preprocess import FastImageTransform

    if choice not in DECODE_CHOICES:
        raise InputError(f"`EmbedOptions.decode` must be one of {', '.join(DECODE_CHOICES)}, got {choice!r}")
    if choice == "cpu":
        return None
    on_cuda = str(device).startswith("cuda")
    if choice == "gpu" and not on_cuda:
        raise InputError(
            f"`EmbedOptions.decode='gpu'` decodes JPEGs on the encoder's GPU, and this encoder runs on {device}: "
            "use `EmbedOptions.decode='cpu'` or 'auto'"
        )
    fast = isinstance(transform, FastImageTransform)
    if choice == "gpu" and not fast:
        raise InputError(
            f"`EmbedOptions.decode='gpu'` needs an encoder with the fast preprocessing; this one uses {transform!r}"
        )
    if choice == "gpu" and not device_decodes_jpeg(str(device)):
        raise InputError(f"`EmbedOptions.decode='gpu'`: torchvision cannot decode JPEGs on {device} here (no nvJPEG)")
    return str(device) if on_cuda and fast and device_decodes_jpeg(str(device)) else None


@cache
def device_decodes_jpeg(device: str) -> bool:
    """Whether torchvision decodes a JPEG on ``device`` (tried once, on a tiny image)."""
    try:
        import torch
        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 200, 30)).save(buffer, "JPEG")
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        return tuple(decode_jpeg([data], mode=ImageReadMode.RGB, device=device)[0].shape) == (3, 16, 16)
    except Exception:  # no torchvision, no nvJPEG, no such device
        return False


def gpu_jpeg_size(data: bytes, max_pixels: int = GPU_MAX_PIXELS) -> tuple[int, int] | None:
    """(width, height) of a JPEG the batched decode can take as it is, else None.

    From the header alone (nothing is decoded): a JPEG (not MPO) in YCbCr (Pillow's mode 'RGB'),
    no EXIF rotation or mirror (orientation 2-8), at most ``max_pixels``, ending in the end-of-image marker.
    """
    from PIL import Image

    if len(data) < 4 or data[:2] != b"\xff\xd8" or data[-2:] != _EOI:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode != "RGB":
                return None
            if img.getexif().get(0x0112, 1) in range(
                2, 9
            ):  # a rotation or mirror (others mean none, as on the CPU path)
                return None
            width, height = img.size
    except Exception:  # anything odd: the CPU path decodes it and reports what is wrong
        return None
    if width < 1 or height < 1 or width * height > max_pixels:
        return None
    return width, height


class JpegBytesDataset:
    """The embedding dataset for the batched decode: plain JPEGs as their bytes, the rest as the CPU path makes them.

    ``cpu``: the CPU path's map-style dataset (``refs`` and ``__getitem__`` giving samples).
    """

    def __init__(self, cpu: Any, max_pixels: int = GPU_MAX_PIXELS) -> None:
        self.cpu = cpu
        self.refs = cpu.refs
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.refs)

    def __getitems__(self, positions: list[int]) -> list[Sample]:
        """A batch: the OS is asked to read every image first (see the CPU dataset's ``__getitems__``)."""
        readahead([self.refs[p] for p in positions])
        return [self[p] for p in positions]

    def __getitem__(self, position: int) -> Sample:
        data = self._bytes(self.refs[position])
        size = None if data is None else gpu_jpeg_size(data, self.max_pixels)
        if data is None or size is None:
            return self.cpu[position]
        return position, data, size[0], size[1], hashlib.sha256(data).hexdigest(), None

    @staticmethod
    def _bytes(ref: Any) -> bytes | None:
        """The item's bytes, or None where reading fails (the CPU path reads again and reports why)."""
        try:
            if ref.opener is not None:
                return ref.read_bytes()
            str(ref.path).encode("utf-8")  # a name the CPU path refuses
            return Path(ref.path).read_bytes()
        except Exception:
            return None


def collate_jpegs(samples: list[Sample]) -> dict[str, Any]:
    """A batch of the CPU path (pixels, ok, failed) plus its JPEGs as one uint8 blob with their lengths
    (one shared-memory tensor for the batch instead of one per image)."""
    import torch

    jpegs = [s for s in samples if isinstance(s[1], bytes)]
    good = [s for s in samples if s[1] is not None and not isinstance(s[1], bytes)]
    blob = bytearray(b"".join(s[1] for s in jpegs))
    return {
        "positions": [s[0] for s in samples],
        "pixels": torch.stack([s[1] for s in good]) if good else None,
        "ok": [(s[0], s[2], s[3], s[4]) for s in good],
        "failed": [(s[0], s[5]) for s in samples if s[1] is None],
        "jpegs": {
            "blob": torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8),
            "lengths": [len(s[1]) for s in jpegs],
            "ok": [(s[0], s[2], s[3], s[4]) for s in jpegs],
        },
    }


class DeviceDecoder:
    """Decodes and preprocesses a batch's JPEGs on ``device``; the ones it cannot go to ``fallback``.

    ``fallback(position)`` returns the CPU path's sample for that image. ``on_device`` and
    ``fell_back`` count images, for tests and benchmarks.
    """

    def __init__(self, transform: Any, device: str, fallback: Callable[[int], Sample]) -> None:
        self.transform = transform
        self.device = device
        self.fallback = fallback
        self.on_device = 0
        self.fell_back = 0

    def finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with its JPEGs decoded: pixels (on ``device``), ok and failed as the CPU path's batch."""
        import torch

        jpegs = batch.pop("jpegs", None)
        if not jpegs or not jpegs["lengths"]:
            return batch
        datas = list(torch.split(jpegs["blob"], jpegs["lengths"]))
        images = self._decode(datas)
        parts = [] if batch["pixels"] is None else [batch["pixels"].to(self.device)]
        ok, failed = list(batch["ok"]), list(batch["failed"])
        for image, row in zip(images, jpegs["ok"], strict=True):
            pixels = None if image is None else self._transform(image)
            if pixels is None:
                self.fell_back += 1
                position, pixels, width, height, sha, reason = self.fallback(row[0])
                if pixels is None:
                    failed.append((position, reason))
                    continue
                row, pixels = (position, width, height, sha), pixels.to(self.device)
            else:
                self.on_device += 1
            parts.append(pixels.unsqueeze(0))
            ok.append(row)
        batch.update(pixels=torch.cat(parts) if parts else None, ok=ok, failed=failed)
        return batch

    def _decode(self, datas: list[Any]) -> list[Any]:
        """uint8 (3, H, W) tensors on the device, None for each JPEG the decoder refuses."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device))
        except Exception:  # one bad JPEG fails the whole batched call: find it
            return [self._decode_one(data) for data in datas]

    def _decode_one(self, data: Any) -> Any:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except Exception:
            return None

    def _transform(self, image: Any) -> Any:
        try:
            return self.transform.transform_tensor(image)
        except Exception:  # the CPU path reports it (or embeds it) as it would have
            return None
