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

import difflib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.core.errors import EncoderError
from retrieval.encoders.preprocess import FastImageTransform, open_clip_transform

from ._hub import cached_hub_file, hub_unreachable_reason
from .base import (
    ImageEncoder,
    TextEncoder,
    as_text_list,
    check_pixels,
    inference_context,
    module_fingerprint,
    short_error,
    to_unit_numpy,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

PREFIX = "open_clip:"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
CONFIG_NAME = "open_clip_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
FETCH_FIX = (
    "it needs internet to download the weights once, or pass --checkpoint PATH to a local file; "
    "see open_clip.list_pretrained()"
)

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
    def load(
        cls, spec: str, checkpoint: str | Path | None = None, device: str = "cpu"
    ) -> OpenClipEncoder:
        """Build the model described by ``spec`` (+ optional ``checkpoint``) on ``device``."""
        plan = _plan(spec, checkpoint)
        try:
            import open_clip
        except ImportError as e:
            raise EncoderError(
                "open_clip is not installed: pip install open_clip_torch"
            ) from e
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                plan["model_name"],
                pretrained=plan["pretrained"],
                device="cpu",
                weights_only=True,
                **plan["kwargs"],
            )
            tokenizer = open_clip.get_tokenizer(plan["model_name"])
        except Exception as e:
            if plan["from_hub"]:
                raise EncoderError(
                    f"cannot load open_clip {plan['what']}: {short_error(e)}; {FETCH_FIX}"
                ) from e
            raise EncoderError(
                f"cannot load open_clip {plan['what']}: {short_error(e)}"
            ) from e
        model.eval()
        model.to(device)
        log.info("loaded %s on %s", plan["spec"], device)
        return cls(model, preprocess, tokenizer, plan["spec"], device)

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
        tower = self._int8_tower()
        with inference_context(self.device):
            pixels = pixels.to(self.device, non_blocking=True)
            features = self._forward("image", tower if tower is not None else self._model.encode_image)(pixels)
        return to_unit_numpy(features)

    def _int8_tower(self) -> Any:
        """On the CPU, the image tower with its Linear layers dynamically quantised to int8, else None.

        Measured by benchmarks/cpu_inference.py on the 2-core CPU: ViT-B/32 1.9x faster than
        float32 (cosine 0.9998); tests/test_encoders.py checks cosine >= 0.99 on real photos.
        Only for models whose ``encode_image`` is the visual tower itself (CLIP, CustomTextCLIP),
        and only where torch has an int8 CPU backend. The text tower stays float32.
        """
        if self._cpu_int8_tower is _UNSET:
            self._cpu_int8_tower = _quantized_visual(self._model) if self.device == "cpu" else None
        return self._cpu_int8_tower

    def encode_texts(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        from tqdm import tqdm

        items = as_text_list(texts)
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = []
        with tqdm(
            total=len(items),
            unit="text",
            disable=not progress,
            file=sys.stderr,
            desc="encode texts",
        ) as bar:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                tokens = self._tokenizer(chunk).to(self.device)
                with inference_context(self.device):
                    features = self._model.encode_text(tokens)
                parts.append(to_unit_numpy(features))
                bar.update(len(chunk))
        return np.concatenate(parts, axis=0)


def _quantized_visual(model: Any) -> Any:
    """A copy of ``model.visual`` with int8 dynamically quantised ``nn.Linear`` layers (None where unsuitable)."""
    import warnings

    import open_clip
    import torch

    plain = (open_clip.CLIP.encode_image, open_clip.CustomTextCLIP.encode_image)
    if getattr(type(model), "encode_image", None) not in plain or not hasattr(model, "visual"):
        return None
    if not {"x86", "fbgemm", "qnnpack"} & set(torch.backends.quantized.supported_engines):
        return None
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; it still works
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model.visual, {torch.nn.Linear}, dtype=torch.qint8, inplace=False).eval()


def _plan(spec: str, checkpoint: str | Path | None) -> dict[str, Any]:
    """Turn a spec + checkpoint into create_model arguments, failing early with clear messages."""
    import open_clip

    body = spec[len(PREFIX) :].strip() if spec.startswith(PREFIX) else spec.strip()
    if not body:
        raise EncoderError(
            "empty open_clip spec; use open_clip:MODEL/PRETRAINED (see open_clip.list_pretrained())"
        )
    ckpt = Path(checkpoint).expanduser().resolve() if checkpoint is not None else None
    if ckpt is not None and not ckpt.exists():
        raise EncoderError(f"checkpoint not found: {ckpt}")
    plan: dict[str, Any] = {"pretrained": None, "kwargs": {}, "from_hub": False}

    if body.startswith((LOCAL_DIR, HF_HUB)):
        if ckpt is not None:
            raise EncoderError(
                f"open_clip:{body} names its own weights; drop the checkpoint argument"
            )
        if body.startswith(LOCAL_DIR):
            directory = Path(body[len(LOCAL_DIR) :]).expanduser().resolve()
            _check_local_dir(directory)
            plan.update(
                spec=f"{PREFIX}{LOCAL_DIR}{directory}",
                model_name=f"{LOCAL_DIR}{directory}",
            )
            plan["what"] = f"model from directory {directory}"
        else:
            reason = hub_unreachable_reason()
            if reason:
                raise EncoderError(
                    f"cannot load open_clip {body}: the hub is unreachable ({reason}); {FETCH_FIX}"
                )
            plan.update(
                spec=f"{PREFIX}{body}", model_name=body, what=body, from_hub=True
            )
        return plan

    model, _, tag = (part.strip() for part in body.partition("/"))
    tag = tag.lower().replace("-", "_")
    plan["spec"] = f"{PREFIX}{model}/{tag}" if tag else f"{PREFIX}{model}"
    if ckpt is not None and ckpt.is_dir():
        # A custom or downloaded architecture: the directory's config wins, MODEL is only a label.
        _check_local_dir(ckpt)
        plan.update(
            model_name=f"{LOCAL_DIR}{ckpt}",
            what=f"model {model!r} from directory {ckpt}",
        )
        return plan

    if model not in open_clip.list_models():
        raise EncoderError(_unknown_model_message(model, open_clip.list_models(), ckpt))
    plan["model_name"] = model
    tag_cfg: dict[str, Any] = {}
    if tag:
        tag_cfg = open_clip.get_pretrained_cfg(model, tag)
        if not tag_cfg:
            raise EncoderError(
                _unknown_tag_message(
                    model, tag, open_clip.list_pretrained_tags_by_model(model)
                )
            )
        plan["kwargs"] = _tag_kwargs(tag_cfg)
    if ckpt is not None:
        if ckpt.suffix not in WEIGHT_SUFFIXES:
            raise EncoderError(
                f"checkpoint {ckpt} is not a weights file ({', '.join(WEIGHT_SUFFIXES)})"
            )
        plan.update(pretrained=str(ckpt), what=f"model {model!r} with weights {ckpt}")
        return plan
    if not tag:
        tags = open_clip.list_pretrained_tags_by_model(model)
        hint = (
            f"open_clip:{model}/{tags[0]}"
            if tags
            else f"open_clip:{model} with --checkpoint PATH"
        )
        raise EncoderError(
            f"open_clip:{model} names no weights; use {hint} (tags: {_few(tags) or 'none'})"
        )
    plan["what"] = f"model {model!r} with pretrained tag {tag!r}"
    reason = hub_unreachable_reason()
    if reason is None:
        plan.update(pretrained=tag, from_hub=True)
        return plan
    cached = _cached_tag_weights(tag_cfg)
    if cached is None:
        raise EncoderError(
            f"cannot load open_clip model {model!r} with pretrained tag {tag!r}: the weights are not in "
            f"the local cache and the hub is unreachable ({reason}); {FETCH_FIX}"
        )
    log.info("hub unreachable (%s); using cached weights %s", reason, cached)
    plan["pretrained"] = cached
    return plan


def _tag_kwargs(tag_cfg: dict[str, Any]) -> dict[str, Any]:
    """create_model_and_transforms overrides that make a local copy of tagged weights behave like the tag."""
    kwargs: dict[str, Any] = {
        "force_quick_gelu": bool(tag_cfg.get("quick_gelu", False))
    }
    for key, arg in (
        ("mean", "image_mean"),
        ("std", "image_std"),
        ("interpolation", "image_interpolation"),
        ("resize_mode", "image_resize_mode"),
    ):
        if tag_cfg.get(key) is not None:
            kwargs[arg] = tag_cfg[key]
    return kwargs


def _cached_tag_weights(tag_cfg: dict[str, Any]) -> str | None:
    """Local path of a tag's weights if an earlier download left them in the hub cache."""
    if tag_cfg.get("file"):
        return str(tag_cfg["file"])
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return None
    repo_id, filename = os.path.split(hub)
    repo_id = repo_id.strip("/")
    filename = filename or "open_clip_pytorch_model.bin"
    candidates = []
    if filename == "open_clip_pytorch_model.bin":
        candidates.append("open_clip_model.safetensors")
    elif filename.endswith((".bin", ".pth")):
        candidates.append(filename[:-4] + ".safetensors")
    candidates.append(filename)
    return cached_hub_file(repo_id, candidates)


def _check_local_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise EncoderError(f"open_clip model directory not found: {directory}")
    if not (directory / CONFIG_NAME).is_file():
        raise EncoderError(
            f"{directory} has no {CONFIG_NAME}; an open_clip model directory needs config + weights"
        )
    if not any(
        p.suffix in WEIGHT_SUFFIXES and p.is_file() for p in directory.iterdir()
    ):
        raise EncoderError(
            f"{directory} has {CONFIG_NAME} but no weights file ({', '.join(WEIGHT_SUFFIXES)})"
        )


def _unknown_model_message(model: str, names: list[str], ckpt: Path | None) -> str:
    by_lower = {n.lower(): n for n in names}
    close = [
        by_lower[c]
        for c in difflib.get_close_matches(
            model.lower(), list(by_lower), n=5, cutoff=0.5
        )
    ]
    msg = f"unknown open_clip model {model!r}"
    msg += (
        f"; close names: {', '.join(close)}"
        if close
        else f"; e.g. {', '.join(names[:5])}"
    )
    msg += " (all: open_clip.list_models())"
    if ckpt is not None:
        msg += f"; for a custom architecture pass the directory holding {CONFIG_NAME} as checkpoint"
    return msg


def _unknown_tag_message(model: str, tag: str, tags: list[str]) -> str:
    if not tags:
        return f"open_clip model {model!r} has no pretrained tags; pass --checkpoint PATH to a local weights file"
    close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown pretrained tag {tag!r} for open_clip model {model!r}{hint} (available: {_few(tags)})"


def _few(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


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
