"""How an opened index loads its anchors and its encoders from what the manifest records."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from retrieval.asif.anchors import AnchorSet, AnchorSpaces, anchor_texts_of
from retrieval.core.errors import IndexFormatError
from retrieval.encoders.base import ImageEncoder, TextEncoder
from retrieval.store.provenance import check_same_encoder
from retrieval.store.reader import StoreReader


def load_anchor_spaces(store: StoreReader, manifest: Mapping[str, Any], path: Path) -> AnchorSpaces:
    """The anchor sets an ASIF index copied in at build time, with their weights."""
    stored = manifest["files"].get("anchors")
    if not stored:
        raise IndexFormatError(f"{path}: an ASIF index without anchors; rebuild it")
    sets = [
        AnchorSet(
            meta["name"],
            store.read_array(files["image"]),
            store.read_array(files["text"]),
            [],
            meta["image_encoder"],
            meta["text_encoder"],
            texts=anchor_texts_of(meta),
        )
        for meta, files in zip(manifest["anchors"], stored, strict=True)
    ]
    return AnchorSpaces(sets, [meta["weight"] for meta in manifest["anchors"]])


def encoder_choice_for(manifest: Mapping[str, Any], device: str) -> Any:
    """The :class:`~retrieval.core.config.EncoderChoice` that loads the encoders an index was built with."""
    from retrieval.core.config import EncoderChoice

    records = manifest["encoders"]
    checkpoint = manifest.get("checkpoint")
    if manifest["mode"] == "clip":
        return EncoderChoice(clip=records["image"]["spec"], checkpoint=checkpoint, device=device)
    return EncoderChoice(
        image=records["image"]["spec"], text=records["text"]["spec"], checkpoint=checkpoint, device=device
    )


def load_checked_encoders(
    manifest: Mapping[str, Any], device: str, snapshots: Any, path: Path
) -> tuple[ImageEncoder, TextEncoder]:
    """(image encoder, text encoder) of an index, each checked against the one it was built with."""
    from retrieval.encoders.registry import load_encoders

    records = manifest["encoders"]
    image_encoder, text_encoder = load_encoders(encoder_choice_for(manifest, device), snapshots=snapshots)
    check_same_encoder(records["image"], image_encoder, f"index {path}")
    check_same_encoder(records["text"], text_encoder, f"index {path}")
    return image_encoder, text_encoder
