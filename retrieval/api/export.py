"""Export a CLIP index in clip-retrieval's layout, so ``clip-retrieval back`` can serve it or a build can come
back from it.

clip-retrieval has one row per sample, an image and its caption side by side, and one metadata
table both FAISS indexes point into. An index here holds images and captions as separate items,
so the export writes:

- one row per caption paired with an image (``image_path`` the image's uri, ``caption`` its text);
- one row per image without a caption (``caption`` null, a zero text vector);
- one row per caption without an image (``image_path`` null, a zero image vector);

``image.index`` holds each image once (its first row) and ``text.index`` each caption, both
inner product over unit vectors, with the metadata row numbers as ids: the zero placeholders and
repeated images are never search results. Each item's source fields (``url``, ``key``, ...) become
metadata columns. Deleted items are left out.

An ASIF index (two unimodal encoders bridged by anchors) is refused: its image and text vectors
live in two unrelated spaces, and clip-retrieval's layout holds one CLIP space. Export the index
only when it was built with a CLIP encoder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.core.errors import InputError
from retrieval.store.clip_layout import INDICES_PATHS, ClipLayoutWriter
from retrieval.store.item_metadata import metadata_at

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = ("clip-retrieval",)
PART_ROWS = 1_000_000  # metadata rows per partition, as clip-retrieval writes them in batches


@dataclass
class ExportReport:
    """What an export wrote."""

    out: str
    rows: int
    images: int
    captions: int
    partitions: int
    indices_paths: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def export_index(
    index_path: str | Path, out: str | Path, format: str = "clip-retrieval", name: str | None = None
) -> ExportReport:
    """Write the index at ``index_path`` to the folder ``out`` in clip-retrieval's layout (``name``: its entry in
    ``indices_paths.json``, default the folder's name)."""
    from retrieval.api.engine import open_index

    if format not in FORMATS:
        raise InputError(f"unknown export format {format!r}; one of {', '.join(FORMATS)}")
    index = open_index(index_path, device="cpu")
    if index.mode != "clip":
        raise InputError(
            f"{index_path}: an ASIF index (two encoders, no shared space) cannot be exported in clip-retrieval's "
            "layout, which holds one CLIP space; export an index built with a CLIP encoder "
            "(`EncoderChoice.clip`)"
        )
    rows = export_rows(index)
    parts = max(1, -(-len(rows[0]) // PART_ROWS))
    writer = ClipLayoutWriter(out, parts)
    with writer:
        _write_parts(writer, index, rows)
        writer.write_faiss("image", _faiss(index, "image", rows[0]))
        writer.write_faiss("text", _faiss(index, "caption", rows[1]))
        writer.write_indices_paths(name or writer.out.name, index.manifest["encoders"]["image"]["spec"])
    image_rows, caption_rows = rows
    return ExportReport(
        out=str(writer.out),
        rows=len(image_rows),
        images=len(_firsts(image_rows)),
        captions=int((caption_rows >= 0).sum()),
        partitions=parts,
        indices_paths=str(writer.out / INDICES_PATHS),
    )


def export_rows(index: Any) -> tuple[np.ndarray, np.ndarray]:
    """The image position and caption position of each exported row (-1 where the row has none)."""
    images, captions = index.items("image"), index.items("caption")
    live_images = index.live("image")
    position_of = {uri: p for p, uri in enumerate(images["uri"]) if live_images[p]}
    by_image: dict[int, list[int]] = {}
    alone: list[int] = []
    for c, live in enumerate(index.live("caption")):
        if live:
            p = position_of.get(captions["image_uri"][c]) if captions["image_uri"][c] else None
            (by_image.setdefault(p, []) if p is not None else alone).append(c)
    image_rows: list[int] = []
    caption_rows: list[int] = []
    for position in np.flatnonzero(live_images):
        paired = by_image.get(int(position), [-1])
        image_rows.extend([int(position)] * len(paired))
        caption_rows.extend(paired)
    image_rows.extend([-1] * len(alone))
    caption_rows.extend(alone)
    return np.asarray(image_rows, np.int64), np.asarray(caption_rows, np.int64)


def _firsts(image_rows: np.ndarray) -> np.ndarray:
    """The row numbers holding each image's first appearance."""
    _, first = np.unique(image_rows, return_index=True)
    first = np.sort(first)
    return first[image_rows[first] >= 0]


def _write_parts(writer: ClipLayoutWriter, index: Any, rows: tuple[np.ndarray, np.ndarray]) -> None:
    images, captions = index.items("image"), index.items("caption")
    sources = {kind: index.vector_source(f"clip/{kind}") for kind in ("image", "caption")}
    image_rows, caption_rows = rows
    for number, start in enumerate(range(0, max(len(image_rows), 1), PART_ROWS)):
        ip, cp = image_rows[start : start + PART_ROWS], caption_rows[start : start + PART_ROWS]
        records = [_record(images, captions, int(i), int(c)) for i, c in zip(ip, cp, strict=True)]
        writer.write_part(number, sources["image"].take(ip), sources["caption"].take(cp), metadata_table(records))


def _record(images: dict[str, list[Any]], captions: dict[str, list[Any]], image: int, caption: int) -> dict[str, Any]:
    """One metadata row: the image's source fields, then the caption's, then ``image_path`` and ``caption``."""
    fields: dict[str, Any] = {}
    if image >= 0:
        fields.update(metadata_at(images, image))
    if caption >= 0:
        fields.update(metadata_at(captions, caption))
    fields["image_path"] = images["uri"][image] if image >= 0 else None
    fields["caption"] = captions["caption"][caption] if caption >= 0 else None
    return fields


def metadata_table(records: Sequence[dict[str, Any]]) -> pa.Table:
    """``image_path`` and ``caption`` first, then every other field; a field whose values do not form one
    column type is written as JSON text."""
    import pyarrow as pa

    names = ["image_path", "caption"] + sorted(
        {key for record in records for key in record} - {"image_path", "caption"}
    )
    columns = {}
    for name in names:
        values = [record.get(name) for record in records]
        try:
            columns[name] = pa.array(values, pa.string()) if name in ("image_path", "caption") else pa.array(values)
        except (pa.ArrowException, TypeError, ValueError):
            columns[name] = pa.array(
                [None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string()
            )
    return (
        pa.table(columns)
        if records
        else pa.table({"image_path": pa.array([], pa.string()), "caption": pa.array([], pa.string())})
    )


def _faiss(index: Any, kind: str, rows: np.ndarray) -> Any:
    """A flat inner-product index of ``kind``'s rows (images once each), ids the metadata row numbers."""
    import faiss

    source = index.vector_source(f"clip/{kind}")
    ids = _firsts(rows) if kind == "image" else np.flatnonzero(rows >= 0)
    flat = faiss.IndexFlatIP(source.dim)
    mapped = flat if np.array_equal(ids, np.arange(len(rows))) else faiss.IndexIDMap2(flat)
    for start in range(0, len(ids), 65_536):
        chunk = ids[start : start + 65_536]
        vectors = np.ascontiguousarray(source.take(rows[chunk]), np.float32)
        if mapped is flat:
            flat.add(vectors)
        else:
            mapped.add_with_ids(vectors, chunk.astype(np.int64))
    return mapped
