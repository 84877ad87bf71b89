"""Image and text encoders behind one small interface (see ``base`` and ``registry``).

Importing this package is cheap: torch, open_clip, timm and sentence-transformers are imported
only when a model is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import ImageEncoder, TextEncoder
from .registry import (
    EncoderInfo,
    is_contrastive,
    list_encoders,
    load_clip_encoder,
    load_image_encoder,
    load_text_encoder,
    resolve_device,
)

if TYPE_CHECKING:
    from .efficientnet import EfficientNetLiteEncoder
    from .open_clip import OpenClipEncoder
    from .sentence_transformers import SentenceTransformerEncoder
    from .timm import TimmEncoder

__all__ = [
    "EfficientNetLiteEncoder",
    "EncoderInfo",
    "ImageEncoder",
    "OpenClipEncoder",
    "SentenceTransformerEncoder",
    "TextEncoder",
    "TimmEncoder",
    "is_contrastive",
    "list_encoders",
    "load_clip_encoder",
    "load_image_encoder",
    "load_text_encoder",
    "resolve_device",
]

_LAZY = {
    "EfficientNetLiteEncoder": ".efficientnet",
    "OpenClipEncoder": ".open_clip",
    "SentenceTransformerEncoder": ".sentence_transformers",
    "TimmEncoder": ".timm",
}


def __getattr__(name: str) -> Any:
    """Backend classes are imported on first access (the modules themselves import no heavy library)."""
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
