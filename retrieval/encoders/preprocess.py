"""Fast image preprocessing that reproduces the encoders' reference torchvision transforms.

The reference transforms are ``Resize -> [CenterCrop] -> ToTensor -> Normalize`` pipelines built
from torchvision ops. :class:`FastImageTransform` computes the same tensor with less work:

* the crop is folded into the resize: ``img.resize(crop_size, resample, box=crop_region)``
  resamples only the pixels that survive the centre crop, with the same filter scale and the
  same source coordinates as resize-then-crop (Pillow's filter support clamps at the image
  edges, not at the box), so the result matches the two-step path up to 1/255 (the box is
  passed to Pillow's C code as float32);
* for very large inputs Pillow's ``reducing_gap`` first shrinks the region by an integer factor
  (``Image.reduce``) and then resamples by at least ``reducing_gap`` with the real filter;
* on x86 CPUs with AVX2 the resize runs in torch's uint8 antialiased kernel (a port of
  Pillow-SIMD's resampler, about 3x Pillow's own; results within 2 levels of Pillow's), on the
  whole image followed by the crop; elsewhere, and for images Pillow must reduce first, Pillow
  resamples only the crop region as above (:attr:`FastImageTransform.resampler`);
* ToTensor + Normalize become one fused ``x * (1 / (255 std)) - mean / std`` over a
  uint8 -> float32 numpy array (no per-op torch dispatch, no intra-op thread pool).

:attr:`FastImageTransform.draft_size` is the smallest decoded size that keeps the resize
quality (twice the resize target): pass it to :func:`retrieval.sources.images.load_image` so large
JPEGs are decoded at 1/2, 1/4 or 1/8 scale but never below it.

Instances hold only numbers and tuples, so they pickle for DataLoader workers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.sources.images import DRAFT_INFO

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "DRAFT_MARGIN",
    "REDUCING_GAP",
    "RESAMPLERS",
    "FastImageTransform",
    "default_resampler",
    "efficientnet_transform",
    "open_clip_transform",
]

# Pillow documents reducing_gap >= 3 as "indistinguishable from fair resampling in most cases";
# it only engages when the resampled region is >= 2 * REDUCING_GAP times the output size.
REDUCING_GAP = 3.0

# A JPEG is decoded at reduced scale only down to this many times the resize target (see draft_size).
DRAFT_MARGIN = 2

_RESAMPLE = {"bicubic": 3, "bilinear": 2}  # PIL.Image.Resampling values (BICUBIC, BILINEAR)
_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}  # filter radius in source pixels at scale 1 (Pillow's)

RESAMPLERS = ("torch", "pillow")
# torch's vectorised uint8 antialiased resize (UpSampleKernelAVXAntialias) exists for these; on
# other CPUs its generic kernel is slower than Pillow (benchmarks/THROUGHPUT.md), so Pillow resamples there
_FAST_TORCH_CAPABILITIES = ("AVX2", "AVX512")


@lru_cache(maxsize=1)
def default_resampler() -> str:
    """'torch' where torch's uint8 antialiased resize is vectorised (x86 with AVX2), else 'pillow'."""
    import torch

    return "torch" if torch.backends.cpu.get_cpu_capability() in _FAST_TORCH_CAPABILITIES else "pillow"


def _triple(values: Any, name: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        values = (values,) * 3
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"{name} needs 3 values (one per RGB channel), got {len(out)}")
    return out


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = (int(v) for v in size)
    return (h, w)


class FastImageTransform:
    """RGB PIL image -> normalised CHW float32 tensor, equal (to one 8-bit level) to the pipeline

    ``Resize(resize, interpolation) -> CenterCrop(crop) -> ToTensor -> Normalize(mean, std)``

    except where the crop region is >= 2 * ``reducing_gap`` times the output (integer box
    reduction first: a few levels here and there) or the image was decoded at reduced JPEG scale.

    ``resize``: an int resizes the shorter side to it (torchvision's rule: the longer side becomes
    ``int(resize * long / short)``); an ``(h, w)`` pair resizes to exactly that size.
    ``crop``: ``(h, w)`` centre crop after the resize, or None. It must fit inside the resized image.
    ``resampler``: 'torch' or 'pillow' (None: :func:`default_resampler`); decided once, so the
    instance pickled into DataLoader workers resamples as the parent would.
    """

    def __init__(
        self,
        resize: int | tuple[int, int],
        crop: int | tuple[int, int] | None,
        mean: Any,
        std: Any,
        interpolation: str = "bicubic",
        reducing_gap: float | None = REDUCING_GAP,
        resampler: str | None = None,
    ) -> None:
        if resampler is None:
            resampler = default_resampler()
        if resampler not in RESAMPLERS:
            raise ValueError(f"resampler must be one of {RESAMPLERS}, got {resampler!r}")
        self.resampler = resampler
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
        if isinstance(resize, int):
            if resize < 1:
                raise ValueError(f"resize must be positive, got {resize}")
            self.resize: int | tuple[int, int] = int(resize)
        else:
            self.resize = _pair(resize)
            if min(self.resize) < 1:
                raise ValueError(f"resize must be positive, got {resize}")
        self.crop = None if crop is None else _pair(crop)
        if self.crop is None and isinstance(self.resize, int):
            raise ValueError("a shorter-side resize needs a crop size (the output must have a fixed size)")
        if self.crop is not None:
            room = (self.resize, self.resize) if isinstance(self.resize, int) else self.resize
            if self.crop[0] > room[0] or self.crop[1] > room[1] or min(self.crop) < 1:
                raise ValueError(f"crop {self.crop} does not fit in the resized image {room}")
        self.mean = _triple(mean, "mean")
        self.std = _triple(std, "std")
        if min(abs(s) for s in self.std) == 0:
            raise ValueError("std must not be 0")
        self.interpolation = interpolation
        self.reducing_gap = reducing_gap
        # (x / 255 - mean) / std == x * scale + bias
        self._scale = np.array([1.0 / (255.0 * s) for s in self.std], np.float32).reshape(3, 1, 1)
        self._bias = np.array([-m / s for m, s in zip(self.mean, self.std, strict=True)], np.float32).reshape(3, 1, 1)

    def settings(self) -> dict[str, Any]:
        """The constructor arguments as plain JSON values (the resampler is left to each process)."""
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "reducing_gap": self.reducing_gap,
        }

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> FastImageTransform:
        """The transform :meth:`settings` describes (lists where tuples were)."""
        resize = settings["resize"]
        return cls(
            resize if isinstance(resize, int) else tuple(resize),
            None if settings["crop"] is None else tuple(settings["crop"]),
            settings["mean"],
            settings["std"],
            settings["interpolation"],
            settings["reducing_gap"],
        )

    @property
    def draft_size(self) -> tuple[int, int]:
        """(width, height) a reduced-scale JPEG decode must keep: DRAFT_MARGIN times the resize
        target, so the bicubic resize still low-passes by >= 2x and smooths over how libjpeg's
        DCT scaling differs from it. At 1x (decoded just above the target) EfficientNet-Lite0
        embeddings of real 512-1200 px photos dropped to cosine 0.967; at 2x they stay >= 0.998."""
        if isinstance(self.resize, int):
            side = DRAFT_MARGIN * self.resize  # both sides >= 2S  <=>  shorter side >= 2S
            return (side, side)
        return (DRAFT_MARGIN * self.resize[1], DRAFT_MARGIN * self.resize[0])

    @property
    def output_size(self) -> tuple[int, int]:
        """(h, w) of the tensors produced."""
        if self.crop is not None:
            return self.crop
        return self.resize  # type: ignore[return-value]  # (h, w): __init__ rejects int without crop

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the reference Resize gives an image of this size (torchvision's rounding)."""
        if not isinstance(self.resize, int):
            return (self.resize[1], self.resize[0])
        if width <= height:
            return (self.resize, int(self.resize * height / width))
        return (int(self.resize * width / height), self.resize)

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Region of the source image that the resized-then-cropped output covers."""
        new_w, new_h = self.resized_size(width, height)
        if self.crop is None:
            return (0.0, 0.0, float(width), float(height))
        crop_h, crop_w = self.crop
        top = round((new_h - crop_h) / 2.0)  # torchvision center_crop's rounding
        left = round((new_w - crop_w) / 2.0)
        # integer products divided once: exact whenever the edge is the image edge
        return (
            left * width / new_w,
            top * height / new_h,
            min((left + crop_w) * width / new_w, float(width)),
            min((top + crop_h) * height / new_h, float(height)),
        )

    def _box(self, width: int, height: int, draft: Any) -> tuple[float, float, float, float]:
        """source_box in the pixels of an image of this size, decoded at reduced scale if ``draft``."""
        try:
            full_w, full_h, scale, off_x, off_y = draft
            if not (full_w > 0 and full_h > 0 and scale > 0):
                raise ValueError
        except (TypeError, ValueError):  # no (or an unusable) hint: the image is what it shows
            return self.source_box(width, height)
        x0, y0, x1, y1 = self.source_box(full_w, full_h)
        return (
            max((x0 - off_x) / scale, 0.0),
            max((y0 - off_y) / scale, 0.0),
            min((x1 - off_x) / scale, float(width)),
            min((y1 - off_y) / scale, float(height)),
        )

    def resize_image(self, img: Image.Image) -> Image.Image:
        """The resized and centre-cropped RGB image; only the crop region is resampled.

        An image that ``load_image`` decoded at reduced JPEG scale carries its full-resolution
        geometry (``DRAFT_INFO``): the crop region is then computed on the full-resolution size,
        exactly as for a full decode, and mapped into the smaller picture.
        """
        draft = img.info.get(DRAFT_INFO)
        if img.mode != "RGB":
            img = img.convert("RGB")
        resample = _RESAMPLE[self.interpolation]
        out_h, out_w = self.output_size
        gap = self.reducing_gap
        if self.crop is None and draft is None:  # exact-size resize of the whole image: the reference's call
            return img.resize((out_w, out_h), resample, reducing_gap=gap)
        width, height = img.size
        x0, y0, x1, y1 = self._box(width, height, draft)
        if gap is not None and min((x1 - x0) / out_w, (y1 - y0) / out_h) >= 2 * gap:
            # far larger than needed (a non-JPEG, or a JPEG even 1/8 scale left large): Pillow
            # box-reduces the region by an integer factor, then resamples by >= gap.
            return img.resize((out_w, out_h), resample, box=(x0, y0, x1, y1), reducing_gap=gap)
        if self.crop is None:
            return img.resize((out_w, out_h), resample, box=(x0, y0, x1, y1))
        # Two explicit one-axis passes, horizontal then vertical, like Pillow's resize of the
        # whole image: given a box Pillow may run the vertical pass first, and the 8-bit
        # intermediate then rounds (and clips bicubic overshoot) differently.
        support = _SUPPORT[self.interpolation] * max((y1 - y0) / out_h, 1.0)
        first = max(0, math.floor(y0 - support))  # every source row a vertical tap can reach
        last = min(height, math.ceil(y1 + support) + 1)
        if first > 0 or last < height:
            img = img.crop((0, first, width, last))
        rows = last - first
        strip = img.resize((out_w, rows), resample, box=(x0, 0, x1, rows))
        return strip.resize((out_w, out_h), resample, box=(0, y0 - first, out_w, y1 - first))

    def _torch_resizes(self, img: Image.Image) -> bool:
        """Whether torch resamples this image: not one decoded at reduced JPEG scale (its crop
        region needs Pillow's fractional box) nor one so large Pillow box-reduces it first."""
        if self.resampler != "torch" or DRAFT_INFO in img.info:
            return False
        out_h, out_w = self.output_size
        x0, y0, x1, y1 = self.source_box(*img.size)
        return self.reducing_gap is None or min((x1 - x0) / out_w, (y1 - y0) / out_h) < 2 * self.reducing_gap

    def resized_pixels(self, img: Image.Image) -> np.ndarray:
        """The resized and centre-cropped image as a uint8 (3, h, w) array (possibly a strided view)."""
        if not self._torch_resizes(img):
            return np.asarray(self.resize_image(img)).transpose(2, 0, 1)
        import torch
        import torch.nn.functional as F

        if img.mode != "RGB":
            img = img.convert("RGB")
        width, height = img.size
        new_w, new_h = self.resized_size(width, height)
        # (1, 3, H, W) view of the HWC bytes: channels-last, the layout torch's uint8 kernel wants
        # (np.array, not asarray: torch wants a writable array; the extra copy costs ~10 us)
        pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0)
        if (new_w, new_h) != (width, height):
            pixels = F.interpolate(pixels, size=(new_h, new_w), mode=self.interpolation, antialias=True)
        out_h, out_w = self.output_size
        top = round((new_h - out_h) / 2.0)  # torchvision center_crop's rounding
        left = round((new_w - out_w) / 2.0)
        return pixels[0, :, top : top + out_h, left : left + out_w].numpy()

    def transform_tensor(self, chw: torch.Tensor) -> torch.Tensor:
        """The transform of a decoded uint8 (3, H, W) RGB tensor on any device (the batched JPEG
        decode of :mod:`retrieval.embed.gpu_decode`): resize with antialiasing, the reference's
        centre crop, rounded to 8 bits like the PIL path, and normalised, all with torch ops on
        the tensor's device. On the CPU the uint8 kernel of :meth:`resized_pixels` runs; CUDA has
        no uint8 antialiased kernel, so it resamples in float32 and rounds."""
        import torch
        import torch.nn.functional as F

        height, width = int(chw.shape[1]), int(chw.shape[2])
        new_w, new_h = self.resized_size(width, height)
        pixels = chw.unsqueeze(0)
        if (new_w, new_h) != (width, height):
            if pixels.device.type == "cpu":
                pixels = F.interpolate(
                    pixels.contiguous(memory_format=torch.channels_last),
                    size=(new_h, new_w),
                    mode=self.interpolation,
                    antialias=True,
                )
            else:
                pixels = F.interpolate(pixels.float(), size=(new_h, new_w), mode=self.interpolation, antialias=True)
                pixels = pixels.round_().clamp_(0, 255)
        out_h, out_w = self.output_size
        top = round((new_h - out_h) / 2.0)  # torchvision center_crop's rounding
        left = round((new_w - out_w) / 2.0)
        pixels = pixels[0, :, top : top + out_h, left : left + out_w].float().contiguous()  # our own copy
        scale = torch.from_numpy(self._scale).to(pixels.device)
        return pixels.mul_(scale).add_(torch.from_numpy(self._bias).to(pixels.device))

    def normalise(self, chw: np.ndarray) -> torch.Tensor:
        """Normalised float32 tensor of a uint8 (3, h, w) array: ToTensor + Normalize in one pass."""
        import torch

        out = np.empty(chw.shape, np.float32)
        np.multiply(chw, self._scale, out=out)
        out += self._bias
        return torch.from_numpy(out)

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """Normalised CHW float32 tensor of an RGB image."""
        return self.normalise(np.asarray(img).transpose(2, 0, 1))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalise(self.resized_pixels(img))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(resize={self.resize}, crop={self.crop}, mean={self.mean}, "
            f"std={self.std}, interpolation={self.interpolation!r}, reducing_gap={self.reducing_gap}, "
            f"resampler={self.resampler!r})"
        )


def efficientnet_transform() -> FastImageTransform:
    """EfficientNet-Lite0: Resize(256, bicubic) -> CenterCrop(224) -> ToTensor -> Normalize(0.5, 0.5)."""
    return FastImageTransform(256, 224, mean=0.5, std=0.5, interpolation="bicubic")


def open_clip_transform(preprocess_cfg: Mapping[str, Any]) -> FastImageTransform | None:
    """The fast equivalent of open_clip's eval transform for ``preprocess_cfg`` (the dict from
    ``open_clip.get_model_preprocess_cfg(model)``), or None where no exact equivalent exists
    (``resize_mode='longest'``, which pads, and non-square 'shortest', which uses ResizeKeepRatio).
    Defaults follow ``open_clip.transform.image_transform``.
    """
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    size = preprocess_cfg.get("size")
    if size is None:
        return None
    h, w = _pair(size)
    mode = preprocess_cfg.get("resize_mode") or "shortest"
    interpolation = "bilinear" if preprocess_cfg.get("interpolation") == "bilinear" else "bicubic"
    if preprocess_cfg.get("mode", "RGB") not in (None, "RGB"):
        return None
    mean = preprocess_cfg.get("mean") or OPENAI_DATASET_MEAN
    std = preprocess_cfg.get("std") or OPENAI_DATASET_STD
    if mode == "squash":
        return FastImageTransform((h, w), None, mean, std, interpolation)
    if mode == "shortest" and h == w:
        return FastImageTransform(h, (h, w), mean, std, interpolation)
    return None
