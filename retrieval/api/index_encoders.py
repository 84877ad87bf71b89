"""The encoders an index was built with: the choice that loads them, loaded and checked against the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrieval.core.config import EncoderChoice
from retrieval.store.provenance import check_same_encoder


def encoder_choice_of(manifest: dict[str, Any], device: str) -> EncoderChoice:
    """The :class:`EncoderChoice` that loads the encoders recorded in ``manifest``, on ``device``."""
    records = manifest["encoders"]
    checkpoint = manifest.get("checkpoint")
    if manifest["mode"] == "clip":
        return EncoderChoice(clip=records["image"]["spec"], checkpoint=checkpoint, device=device)
    return EncoderChoice(image=records["image"]["spec"], text=records["text"]["spec"], checkpoint=checkpoint, device=device)


def load_index_encoders(manifest: dict[str, Any], path: Path, device: str, snapshots: str | Path | None) -> tuple[Any, Any]:
    """(image encoder, text encoder) of the index at ``path``, each checked to be the one it was built with."""
    from retrieval.encoders.registry import load_encoders

    records = manifest["encoders"]
    image_encoder, text_encoder = load_encoders(encoder_choice_of(manifest, device), snapshots=snapshots)
    check_same_encoder(records["image"], image_encoder, f"index {path}")
    check_same_encoder(records["text"], text_encoder, f"index {path}")
    return image_encoder, text_encoder
