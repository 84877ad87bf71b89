"""The encoder interface every backend implements, plus small shared helpers."""

from __future__ import annotations

import hashlib
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "ImageEncoder",
    "TextEncoder",
    "encode_text_batches",
    "inference_context",
    "module_fingerprint",
    "short_error",
    "to_rgb",
    "to_unit_numpy",
    "weights_fingerprint",
]


class ImageEncoder(ABC):
    """Maps RGB images to L2-normalised float32 vectors of length ``dim``."""

    spec: str  # canonical spec string, e.g. "efficientnet-lite0"
    dim: int
    device: str  # resolved: "cpu", "cuda" or "cuda:N", never "auto"

    @abstractmethod
    def fingerprint(self) -> str:
        """16 hex chars identifying the weights (same weights -> same value in any process)."""

    @property
    def numerics(self) -> str:
        """How the vectors are computed (part of embedding-cache keys): same weights, other arithmetic, other
        vectors."""
        return "fp16-autocast" if str(self.device).startswith("cuda") else "fp32"

    @abstractmethod
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """Picklable callable: RGB PIL image -> CHW float32 tensor ready for ``encode_image_tensors``.

        Backends return their fastest equivalent of :meth:`reference_transform` (see
        ``retrieval.encoders.preprocess``); it accepts an image decoded with ``load_image(path,
        draft_size=self.draft_size)``.
        """

    def reference_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The model's own (torchvision) preprocessing that :meth:`image_transform` reproduces;
        picklable. For tests and benchmarks: slower, same tensors up to resampling rounding."""
        return self.image_transform()

    @property
    def draft_size(self) -> tuple[int, int] | None:
        """(width, height) an upright image must keep when decoded at reduced scale so that
        :meth:`image_transform` gives the same quality, for ``load_image(draft_size=...)``; None
        means decode in full."""
        return None

    @contextmanager
    def compiled(self) -> Iterator[None]:
        """Inside this block the image model runs through ``torch.compile`` (compiled on first
        use in this process, kept for later blocks). Meant for CUDA: on a CPU the compile time outweighs
        the gain for one build (``benchmarks/THROUGHPUT.md``)."""
        previous = self.__dict__.get("_compile_on", False)
        self._compile_on = True
        try:
            yield
        finally:
            self._compile_on = previous

    def _forward(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, or inside :meth:`compiled` its ``torch.compile`` version (one per ``key``)."""
        if not self.__dict__.get("_compile_on", False):
            return fn
        cache = self.__dict__.setdefault("_compiled_forwards", {})
        if key not in cache:
            import torch

            cache[key] = torch.compile(fn, dynamic=False)
        return cache[key]

    def prepare(self) -> None:  # noqa: B027 - an optional hook: encoders with nothing to build keep this no-op
        """Build whatever :meth:`encode_image_tensors` would build on first use (e.g. a quantised
        copy of the model), so that worker processes forked afterwards share it."""

    @abstractmethod
    def encode_image_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        """Encode a (B,3,H,W) batch of transformed images -> (B,dim) float32 unit rows."""

    def encode_images(self, images: Sequence[Image.Image] | Image.Image, batch_size: int = 64) -> np.ndarray:
        """Transform and encode PIL images (a single image counts as a batch of one)."""
        import torch

        if not isinstance(images, Sequence):
            images = [images]
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        transform = self.image_transform()
        parts = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            parts.append(self.encode_image_tensors(torch.stack([transform(im) for im in chunk])))
        return np.concatenate(parts, axis=0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, dim={self.dim}, device={self.device!r})"


class TextEncoder(ABC):
    """Maps strings to L2-normalised float32 vectors of length ``dim``."""

    spec: str
    dim: int
    device: str

    @abstractmethod
    def fingerprint(self) -> str:
        """16 hex chars identifying the weights (same weights -> same value in any process)."""

    @property
    def numerics(self) -> str:
        """How the vectors are computed (part of embedding-cache keys): same weights, other arithmetic, other
        vectors."""
        return "fp16-autocast" if str(self.device).startswith("cuda") else "fp32"

    @abstractmethod
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Encode texts -> (N,dim) float32 unit rows; ``progress`` shows a tqdm bar on stderr."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, dim={self.dim}, device={self.device!r})"


def module_fingerprint(module: Any) -> str:
    """sha256 over ``module.state_dict()`` (key, dtype, shape and raw bytes of each tensor, in key order).

    Call it while the weights are still in their loaded dtype: the value depends on the bytes,
    so a half-precision copy of the same weights would hash differently.
    """
    return weights_fingerprint(module.state_dict().items())


def weights_fingerprint(named_tensors: Iterable[tuple[str, Any]]) -> str:
    """16 hex chars of sha256 over (name, dtype, shape, raw bytes) of each tensor, in the given order."""
    import torch

    digest = hashlib.sha256()
    for key, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@contextmanager
def inference_context(device: str) -> Iterator[None]:
    """``torch.inference_mode`` plus float16 autocast on CUDA (weights stay float32)."""
    import torch

    with torch.inference_mode():
        if device.startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.float16):
                yield
        else:
            yield


def to_unit_numpy(features: torch.Tensor) -> np.ndarray:
    """float32 CPU numpy copy of ``features`` with each row scaled to unit L2 norm."""
    import torch

    features = features.float()
    features = torch.nn.functional.normalize(features, dim=-1)
    return np.ascontiguousarray(features.cpu().numpy(), dtype=np.float32)


def encode_text_batches(
    texts: Sequence[str] | str, dim: int, batch_size: int, progress: bool, encode: Callable[[list[str]], Any]
) -> np.ndarray:
    """Unit rows of ``encode(chunk)`` over ``texts`` in chunks of ``batch_size``, with a "captions" bar when
    ``progress``."""
    from tqdm import tqdm

    items = as_text_list(texts)
    if not items:
        return np.zeros((0, dim), dtype=np.float32)
    parts = []
    with tqdm(total=len(items), unit="text", disable=not progress, file=sys.stderr, desc="captions") as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            parts.append(to_unit_numpy(encode(chunk)))
            bar.update(len(chunk))
    return np.concatenate(parts, axis=0)


def check_pixels(pixels: Any) -> None:
    """Raise ValueError unless ``pixels`` is a (B,3,H,W) tensor."""
    import torch

    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
        shape = tuple(pixels.shape) if hasattr(pixels, "shape") else type(pixels).__name__
        raise ValueError(f"expected a (B,3,H,W) image tensor, got {shape}")


def as_text_list(texts: Sequence[str] | str) -> list[str]:
    """A list of strings; a bare string counts as one text."""
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    for t in out:
        if not isinstance(t, str):
            raise TypeError(f"texts must be strings, got {type(t).__name__}")
    return out


def short_error(e: BaseException, limit: int = 300) -> str:
    """One-line, length-capped text of an exception for use inside EncoderError messages."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB mode (module-level so transforms that use it stay picklable)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def native_cpu_bfloat16() -> bool:
    """True when this CPU has native bfloat16 matrix instructions (else bfloat16 autocast would be slower)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
