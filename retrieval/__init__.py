"""Vision-language similarity search: text -> image and image -> caption retrieval.

Contrastive encoders (CLIP through open_clip) share one space; frozen unimodal
encoders are bridged training-free with ASIF relative representations over a
set of anchor (image, caption) pairs.
"""

from __future__ import annotations

from retrieval.api.build import BuildOptions, build_anchors, build_index
from retrieval.api.dedup import DuplicateGroup, DuplicateItem
from retrieval.api.engine import Index, open_index
from retrieval.api.update import UpdateReport, add_to_index, remove_from_index
from retrieval.asif.anchors import AnchorSet, load_anchor_set
from retrieval.asif.relative import AsifParams
from retrieval.core.config import CaptionOptions, EncoderChoice, IndexOptions
from retrieval.core.errors import (
    EncoderError,
    EncoderMismatchError,
    ImageDecodeError,
    IndexFormatError,
    IndexLockedError,
    InputError,
    RetrievalError,
)
from retrieval.core.hits import CaptionHit, ImageHit
from retrieval.core.query import Query, QueryPart
from retrieval.core.search import SearchKnobs, SearchOptions
from retrieval.core.version import __version__
from retrieval.embed.pipeline import EmbedOptions

__all__ = [
    "AnchorSet",
    "AsifParams",
    "BuildOptions",
    "CaptionHit",
    "CaptionOptions",
    "DuplicateGroup",
    "DuplicateItem",
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
    "Query",
    "QueryPart",
    "RetrievalError",
    "SearchKnobs",
    "SearchOptions",
    "UpdateReport",
    "__version__",
    "add_to_index",
    "build_anchors",
    "build_index",
    "load_anchor_set",
    "open_index",
    "remove_from_index",
]
