"""What an index or anchor set records about the encoders that made it, and the check on reuse."""

from __future__ import annotations

from typing import Any

from retrieval.core.errors import EncoderMismatchError
from retrieval.encoders.base import ImageEncoder, TextEncoder


def encoder_record(encoder: ImageEncoder | TextEncoder) -> dict[str, Any]:
    """The manifest entry for an encoder: spec, output dimension and weights fingerprint."""
    return {"spec": encoder.spec, "dim": int(encoder.dim), "fingerprint": encoder.fingerprint()}


def check_same_encoder(recorded: dict[str, Any], encoder: ImageEncoder | TextEncoder, where: str) -> None:
    """Raise :class:`EncoderMismatchError` unless ``encoder`` is the one ``recorded`` in ``where``."""
    current = encoder_record(encoder)
    if current["dim"] != recorded.get("dim") or current["fingerprint"] != recorded.get("fingerprint"):
        raise EncoderMismatchError(
            f"{where} was built with encoder {recorded.get('spec')} (dim {recorded.get('dim')}, weights "
            f"{recorded.get('fingerprint')}), but {current['spec']} (dim {current['dim']}, weights "
            f"{current['fingerprint']}) was given; use the same encoder and checkpoint, or rebuild"
        )
