"""What the server says about an item: hits of ``/api/v1``, item records, and clip-back metadata and ids.

Ids: every item's integer id is its row position in its kind's items table (``Index.items(kind)``
order), stable for the life of a build and across restarts of it. clip back has one id space, so its
endpoints encode captions as ``CAPTION_BASE + position`` (images stay their position): all below 2**53.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from retrieval.serve.errors import ApiError
from retrieval.serve.served import Snapshot
from retrieval.store.item_metadata import METADATA_COLUMN, decode_metadata, metadata_at

CAPTION_BASE = 1 << 40  # compat id of caption row p: CAPTION_BASE + p; image row p: p
MAX_ROWS = CAPTION_BASE  # a build holds fewer rows than this of each kind


def compat_id(kind: str, position: int) -> int:
    return position + (CAPTION_BASE if kind == "caption" else 0)


def from_compat_id(value: int) -> tuple[str, int]:
    """(kind, position) of a clip-back id (no check that the row exists)."""
    return ("caption", value - CAPTION_BASE) if value >= CAPTION_BASE else ("image", value)


def thumbnail_url(snapshot: Snapshot, position: int | None) -> str | None:
    return None if position is None else f"/api/v1/thumbnails/{position}?index={quote(snapshot.name)}"


def _cell(table: dict[str, list], column: str, position: int) -> Any:
    values = table.get(column)
    return values[position] if values is not None else None


def paired_image(snapshot: Snapshot, position: int) -> int | None:
    """The live image row a caption is paired with (None when it has none)."""
    return snapshot.image_position(_cell(snapshot.index.items("caption"), "image_uri", position))


def first_caption(snapshot: Snapshot, image_position: int) -> str | None:
    """The first live caption paired with an image (its text), or None."""

    def build() -> dict[int, str]:
        table = snapshot.index.items("caption")
        out: dict[int, str] = {}
        for position, uri in enumerate(table["image_uri"]):
            image = snapshot.image_position(uri)
            if image is not None and image not in out and snapshot.is_live("caption", position):
                out[image] = table["caption"][position]
        return out

    return snapshot.parts.get("first-captions", build).get(image_position)


def hit(snapshot: Snapshot, kind: str, position: int, score: float, rank: int) -> dict[str, Any]:
    """One ``/api/v1`` hit."""
    table = snapshot.index.items(kind)
    out: dict[str, Any] = {"rank": rank, "id": position, "kind": kind, "score": score}
    if kind == "image":
        out.update(
            uri=table["uri"][position],
            width=int(table["width"][position]),
            height=int(table["height"][position]),
            caption=first_caption(snapshot, position),
            thumbnail=thumbnail_url(snapshot, position),
        )
    else:
        image = paired_image(snapshot, position)
        out.update(
            caption=table["caption"][position],
            source=table["source"][position],
            image_id=image,
            thumbnail=thumbnail_url(snapshot, image),
        )
    meta = metadata_at(table, position)
    out.update(url=_url(meta), metadata=meta)
    return out


def _url(meta: dict[str, Any]) -> str | None:
    """The item's ``url`` from its source fields (img2dataset's json, a clip-retrieval column), if any."""
    url = meta.get("url")
    return url if isinstance(url, str) and url else None


def item_record(snapshot: Snapshot, kind: str, position: int) -> dict[str, Any]:
    """Every stored column of one live item, with ``id`` the integer id and ``item_id`` the stored id string."""
    if kind not in ("image", "caption"):
        raise ApiError(404, f"no kind {kind!r}; items are 'image' or 'caption'")
    if not snapshot.is_live(kind, position):
        raise ApiError(404, f"no {kind} {position} in index {snapshot.name}")
    table = snapshot.index.items(kind)
    record = {column: values[position] for column, values in table.items()}
    record["item_id"] = record.pop("id")
    record.update(id=position, kind=kind, metadata=decode_metadata(record.get(METADATA_COLUMN)))
    record["url"] = _url(record["metadata"])
    if kind == "caption":
        record["image_item_id"] = record.get("image_id")
        record["image_id"] = paired_image(snapshot, position)
    return record


def compat_metadata(snapshot: Snapshot, kind: str, position: int) -> dict[str, Any]:
    """clip back's metadata columns of one item: ``image_path``, ``caption`` and ``url`` where they exist.

    The item's source fields (e.g. img2dataset's url, key, width, sha256) come along as further
    columns, the way clip-retrieval's metadata parquet carries them; ``url`` comes from them when the
    source had one, else from an ``http(s)`` uri.
    """
    table = snapshot.index.items(kind)
    if kind == "image":
        uri = table["uri"][position]
        caption = first_caption(snapshot, position)
    else:
        uri, caption = table["image_uri"][position], table["caption"][position]
    meta: dict[str, Any] = {
        key: value
        for key, value in metadata_at(table, position).items()
        if key not in ("image_path", "caption", "image")
    }
    if uri:
        meta["image_path"] = uri
        if uri.startswith(("http://", "https://")) and not _url(meta):
            meta["url"] = uri
    if caption is not None:
        meta["caption"] = caption
    return meta


def compat_image_position(snapshot: Snapshot, kind: str, position: int) -> int | None:
    """The image whose thumbnail goes with a compat result: the image itself, or a caption's paired image."""
    return position if kind == "image" else paired_image(snapshot, position)
