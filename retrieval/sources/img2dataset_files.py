"""img2dataset's ``files`` layout: ``00000/000000017.jpg`` next to ``000000017.txt`` (its caption)
and ``000000017.json`` (url, key, caption, width, height, sha256, ...).

The images stay file items (same ids as loose files); an image with a ``.json`` sidecar gains
that json as its metadata and a caption paired with it, from the ``.txt`` sidecar or the json's
``caption``. Images without a json sidecar are plain images: a folder of photos is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from retrieval.sources.items import CaptionRecord, ImageRef, ItemError
from retrieval.sources.webdataset_tar import MAX_SIDECAR_BYTES, ShardItems


def _read_small(path: Any) -> bytes | None:
    """A sidecar's bytes, None when there is none; OSError/ValueError for one that cannot be used."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size > MAX_SIDECAR_BYTES:
        raise ValueError(f"{size} bytes, too large for a caption or metadata")
    return path.read_bytes()


def _sidecars(ref: ImageRef) -> tuple[dict[str, Any] | None, str | None]:
    """(json metadata, caption text) of an image; ValueError/OSError naming a bad sidecar."""
    assert ref.path is not None
    raw = _read_small(ref.path.with_suffix(".json"))
    if raw is None:
        return None, None
    metadata = json.loads(raw.decode("utf-8"))
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata is a JSON {type(metadata).__name__}, not an object")
    text_raw = _read_small(ref.path.with_suffix(".txt"))
    text = text_raw.decode("utf-8") if text_raw is not None else metadata.get("caption")
    return metadata, (text.strip() if isinstance(text, str) and text.strip() else None)


def with_sidecars(refs: Iterable[ImageRef]) -> ShardItems:
    """The images of ``refs``, each with its img2dataset sidecars (metadata, a paired caption) where it has them."""
    out = ShardItems()
    for ref in refs:
        if ref.path is None:
            out.images.append(ref)
            continue
        try:
            metadata, text = _sidecars(ref)
        except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            out.errors.append(
                ItemError(
                    path=str(ref.path.with_suffix(".json")),
                    kind="caption",
                    reason=f"unreadable img2dataset sidecar ({type(e).__name__}: {e}); image kept without it",
                )
            )
            metadata, text = None, None
        if metadata is None:
            out.images.append(ref)
            continue
        out.images.append(replace(ref, metadata=metadata))
        if text is None:
            out.errors.append(
                ItemError(
                    path=str(ref.path),
                    kind="caption",
                    reason="no caption (.txt or json 'caption'); image kept without it",
                )
            )
        else:
            source = ref.path.with_suffix(".txt")
            out.captions.append(CaptionRecord(text=text, source=str(source), row=1, image=ref.path, metadata=metadata))
    return out
