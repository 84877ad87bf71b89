"""timm backend (image only): ``timm:NAME`` uses a timm model's pooled pre-logits features.

``timm:NAME`` (NAME may carry a weights tag, e.g. ``resnet50.a1_in1k``) downloads the pretrained
weights from the hub once; with ``checkpoint=FILE`` the local file is loaded instead, through
timm's own pretrained-loading path (weights_only; the classifier head is dropped).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.core.errors import EncoderError

from ._hub import cached_hub_file, hub_unreachable_reason
from .base import (
    ImageEncoder,
    check_pixels,
    inference_context,
    module_fingerprint,
    short_error,
    to_rgb,
    to_unit_numpy,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

PREFIX = "timm:"
FETCH_FIX = "it needs internet to download the weights once, or pass `EncoderChoice.checkpoint` (a local file)"

__all__ = ["PREFIX", "TimmEncoder"]


class TimmEncoder(ImageEncoder):
    """A timm classification backbone with its head removed; embeddings are unit-norm pooled features."""

    def __init__(self, model: Any, transform: Callable, spec: str, device: str) -> None:
        self._model = model
        self._transform = transform
        self._fingerprint: str | None = None
        self.spec = spec
        self.device = device
        self.dim = int(getattr(model, "head_hidden_size", None) or model.num_features)

    @classmethod
    def load(cls, spec: str, checkpoint: str | Path | None = None, device: str = "cpu") -> TimmEncoder:
        """Create ``timm:NAME`` with hub weights, or with local weights from ``checkpoint``."""
        try:
            import timm
        except ImportError as e:
            raise EncoderError("timm is not installed: pip install timm") from e
        name = spec[len(PREFIX) :].strip() if spec.startswith(PREFIX) else spec.strip()
        if not name or not timm.is_model(name):
            raise EncoderError(_unknown_model_message(name, timm.list_models()))
        overlay: dict[str, Any] | None = None
        from_hub = checkpoint is None
        if checkpoint is not None:
            path = Path(checkpoint).expanduser().resolve()
            if not path.is_file():
                raise EncoderError(f"checkpoint not found: {path}")
            overlay = {"file": str(path)}
        else:
            reason = hub_unreachable_reason()
            if reason:
                cached = _cached_weights(name)
                if cached is None:
                    raise EncoderError(
                        f"cannot load timm model {name!r}: the weights are not in the local cache and the hub "
                        f"is unreachable ({reason}); {FETCH_FIX}"
                    )
                overlay = {"file": cached}
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0)
            data_cfg = timm.data.resolve_model_data_config(model)
            transform = timm.data.create_transform(**data_cfg, is_training=False)
            transform.transforms.insert(0, to_rgb)
        except Exception as e:
            fix = f"; {FETCH_FIX}" if from_hub else ""
            raise EncoderError(f"cannot load timm model {name!r}: {short_error(e)}{fix}") from e
        model.eval()
        model.to(device)
        log.info("loaded timm:%s on %s", name, device)
        return cls(model, transform, f"{PREFIX}{name}", device)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(self._model)
        return self._fingerprint

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self._transform

    def encode_image_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        check_pixels(pixels)
        with inference_context(self.device):
            features = self._forward("image", self._model)(pixels.to(self.device, non_blocking=True))
        return to_unit_numpy(features)


def _cached_weights(name: str) -> str | None:
    """A previously downloaded hub copy of ``name``'s weights, if any."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except (RuntimeError, KeyError, ValueError):
        return None
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    return cached_hub_file(repo, ["model.safetensors", "pytorch_model.bin"])


def _unknown_model_message(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return f"unknown timm model {name!r}{hint} (all: timm.list_models())"
