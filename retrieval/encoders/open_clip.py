"""OpenCLIP backend: one contrastive model that embeds images and texts into the same space.

Specs (``checkpoint`` is the CLI's ``--checkpoint PATH``):

* ``open_clip:MODEL/PRETRAINED`` - built-in architecture + hub weights tag (downloaded once, then
  cached); with ``checkpoint=FILE`` the file is used in place of the download (same preprocessing).
* ``open_clip:MODEL`` + ``checkpoint=FILE`` - built-in architecture, local weights file.
* ``open_clip:local-dir:DIR`` or ``open_clip:ANYNAME`` + ``checkpoint=DIR`` - a directory holding
  ``open_clip_config.json`` and a weights file (open_clip's "local-dir:" schema); this is how custom
  (e.g. tiny test) architectures load. ANYNAME is only a label kept in the spec.
* ``open_clip:hf-hub:ORG/REPO`` - open_clip's own hub schema (needs internet once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.core.errors import EncoderError
from retrieval.encoders.preprocess import FastImageTransform, open_clip_transform

from .base import (
    ImageEncoder,
    TextEncoder,
    check_pixels,
    encode_text_batches,
    inference_context,
    module_fingerprint,
    short_error,
    to_unit_numpy,
)
from .open_clip_loading import FETCH_FIX, PREFIX, plan_load

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["PREFIX", "OpenClipEncoder"]

_UNSET = object()


class OpenClipEncoder(ImageEncoder, TextEncoder):
    """An open_clip model used as both image and text encoder (see module docstring for specs)."""

    def __init__(
        self,
        model: Any,
        preprocess: Callable,
        tokenizer: Callable,
        spec: str,
        device: str,
    ) -> None:
        self._model = model
        self._preprocess = preprocess
        self._tokenizer = tokenizer
        self._fingerprint: str | None = None
        self._fast: FastImageTransform | None | object = _UNSET
        self._cpu_int8_tower: Any = _UNSET
        self.spec = spec
        self.device = device
        self.dim = _embed_dim(model, tokenizer)

    @classmethod
    def load(cls, spec: str, checkpoint: str | Path | None = None, device: str = "cpu") -> OpenClipEncoder:
        """Build the model described by ``spec`` (+ optional ``checkpoint``) on ``device``."""
        plan = plan_load(spec, checkpoint)
        try:
            import open_clip
        except ImportError as e:
            raise EncoderError("open_clip is not installed: pip install open_clip_torch") from e
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                plan.model_name,
                pretrained=plan.pretrained,
                device="cpu",
                weights_only=True,
                **plan.kwargs,
            )
            tokenizer = open_clip.get_tokenizer(plan.model_name)
        except Exception as e:
            fix = f"; {FETCH_FIX}" if plan.from_hub else ""
            raise EncoderError(f"cannot load open_clip {plan.what}: {short_error(e)}{fix}") from e
        model.eval()
        model.to(device)
        log.info("loaded %s on %s", plan.spec, device)
        return cls(model, preprocess, tokenizer, plan.spec, device)

    @property
    def model(self) -> Any:
        """The open_clip model (eval mode, on :attr:`device`)."""
        return self._model

    @property
    def tokenizer(self) -> Callable:
        """open_clip's tokenizer for the model: list of strings -> (N, context_length) token ids."""
        return self._tokenizer

    def image_tower(self) -> Callable:
        """What :meth:`encode_image_tensors` runs: the int8 tower where one is built, else ``encode_image``."""
        tower = self._int8_tower()
        return tower if tower is not None else self._model.encode_image

    def float_towers(self) -> tuple[Any, Any] | None:
        """(text, image) float32 modules holding only their own tower's weights, for query snapshots;
        None for models whose ``encode_image`` is not just the visual tower."""
        import torch

        if not _plain_visual(self._model):
            return None
        return _TextTower(self._model, torch.nn.Module), self._model.visual

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(self._model)
        return self._fingerprint

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The fast equivalent of the model's preprocess (its own where none exists)."""
        fast = self._fast_transform()
        return fast if fast is not None else self._preprocess

    def reference_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self._preprocess

    @property
    def draft_size(self) -> tuple[int, int] | None:
        fast = self._fast_transform()
        return fast.draft_size if fast is not None else None

    def _fast_transform(self) -> FastImageTransform | None:
        if self._fast is _UNSET:
            self._fast = _fast_preprocess(self._model)
        return self._fast  # type: ignore[return-value]

    @property
    def logit_scale(self) -> float:
        """The model's learned temperature, exp(logit_scale)."""
        return float(self._model.logit_scale.detach().exp().item())

    @property
    def numerics(self) -> str:
        """How image vectors are computed (part of embedding-cache keys): int8 Linear layers on the CPU."""
        return "int8-linear" if self._int8_tower() is not None else super().numerics

    def prepare(self) -> None:
        self._int8_tower()

    def encode_image_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        check_pixels(pixels)
        with inference_context(self.device):
            pixels = pixels.to(self.device, non_blocking=True)
            features = self._forward("image", self.image_tower())(pixels)
        return to_unit_numpy(features)

    def _int8_tower(self) -> Any:
        """On the CPU, the image tower with its Linear layers dynamically quantised to int8, else None.

        Faster than float32 on the CPU (benchmarks/cpu_inference.py, figures in benchmarks/THROUGHPUT.md);
        tests/test_encoders.py checks cosine >= 0.99 on real photos.
        Only for models whose ``encode_image`` is the visual tower itself (CLIP, CustomTextCLIP),
        and only where torch has an int8 CPU backend. The text tower stays float32.
        """
        if self._cpu_int8_tower is _UNSET:
            self._cpu_int8_tower = _quantized_visual(self._model) if self.device == "cpu" else None
        return self._cpu_int8_tower

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        def encode(chunk: list[str]) -> Any:
            with inference_context(self.device):
                return self._model.encode_text(self._tokenizer(chunk).to(self.device))

        return encode_text_batches(texts, self.dim, batch_size, progress, encode)


def _plain_visual(model: Any) -> bool:
    """Whether ``model.encode_image`` is ``model.visual`` itself (CLIP, CustomTextCLIP)."""
    import open_clip

    plain = (open_clip.CLIP.encode_image, open_clip.CustomTextCLIP.encode_image)
    return getattr(type(model), "encode_image", None) in plain and hasattr(model, "visual")


# What open_clip's encode_text reads from the model (CLIP: its own text parts; CustomTextCLIP: ``text``).
_TEXT_PARTS = (
    "text",
    "token_embedding",
    "positional_embedding",
    "transformer",
    "attn_mask",
    "ln_final",
    "text_pool_type",
    "text_eos_id",
    "text_projection",
)


def _TextTower(model: Any, module_type: type) -> Any:  # a class-like factory: builds a module
    """A module that runs ``type(model).encode_text`` over only the model's text parts (no image weights)."""

    class TextTower(module_type):
        def __init__(self) -> None:
            super().__init__()
            for name in _TEXT_PARTS:
                if hasattr(model, name):
                    setattr(self, name, getattr(model, name))
            self.encode = type(model).encode_text

        def forward(self, tokens: Any) -> Any:
            return self.encode(self, tokens)

    return TextTower().eval()


def _quantized_visual(model: Any) -> Any:
    """A copy of ``model.visual`` with int8 dynamically quantised ``nn.Linear`` layers (None where unsuitable)."""
    import torch

    if not _plain_visual(model):
        return None
    if not {"x86", "fbgemm", "qnnpack"} & set(torch.backends.quantized.supported_engines):
        return None
    # torch.ao.quantization announces its move to torchao (it still works); the warning is left to the
    # caller's filters (the CLI hides it): catch_warnings here would race with other threads' warnings.
    return torch.ao.quantization.quantize_dynamic(
        model.visual, {torch.nn.Linear}, dtype=torch.qint8, inplace=False
    ).eval()


def _fast_preprocess(model: Any) -> FastImageTransform | None:
    """Fast transform from the model's open_clip preprocess config (size, resize mode,
    interpolation, mean, std), or None where the config has no exact fast equivalent."""
    import open_clip

    try:
        cfg = open_clip.get_model_preprocess_cfg(model)
    except Exception:  # an old or unusual model object: keep open_clip's own preprocess
        return None
    fast = open_clip_transform(cfg) if cfg else None
    if fast is None:
        log.info("no fast preprocessing for open_clip config %s; using open_clip's transform", cfg)
    return fast


def _embed_dim(model: Any, tokenizer: Callable) -> int:
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if isinstance(dim, int):
        return dim
    device = next(model.parameters()).device
    with inference_context(str(device)):
        return int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
