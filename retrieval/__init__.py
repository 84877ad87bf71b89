"""Vision-language similarity search: text -> image and image -> caption retrieval.

Contrastive encoders (CLIP through open_clip) share one space; frozen unimodal
encoders are bridged training-free with ASIF relative representations over a
set of anchor (image, caption) pairs.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .anchors import AnchorSet, load_anchor_set  # noqa: E402
from .build import build_anchors, build_index  # noqa: E402
from .config import CaptionOptions, EncoderChoice, IndexOptions  # noqa: E402
from .embed import EmbedOptions  # noqa: E402
from .engine import Index, open_index  # noqa: E402
from .errors import (  # noqa: E402
    EncoderError,
    EncoderMismatchError,
    ImageDecodeError,
    IndexFormatError,
    IndexLockedError,
    InputError,
    RetrievalError,
)
from .hits import CaptionHit, ImageHit  # noqa: E402
from .index_spec import SearchKnobs  # noqa: E402
from .relative import AsifParams  # noqa: E402
from .update import UpdateReport, add_to_index, remove_from_index  # noqa: E402

__all__ = [
    "AnchorSet",
    "AsifParams",
    "CaptionHit",
    "CaptionOptions",
    "EmbedOptions",
    "EncoderChoice",
    "EncoderError",
    "EncoderMismatchError",
    "ImageDecodeError",
    "ImageHit",
    "Index",
    "IndexOptions",
    "IndexFormatError",
    "IndexLockedError",
    "InputError",
    "RetrievalError",
    "SearchKnobs",
    "UpdateReport",
    "__version__",
    "add_to_index",
    "build_anchors",
    "build_index",
    "load_anchor_set",
    "open_index",
    "remove_from_index",
]
