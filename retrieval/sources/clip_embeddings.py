"""clip-retrieval's inference output as a source: vectors already made, with their metadata.

The layout ``clip-retrieval inference`` writes (``clip_retrieval/clip_inference/writer.py``)::

    DIR/img_emb/img_emb_{N}.npy          (rows, dim) float16/float32, one row per sample
    DIR/text_emb/text_emb_{N}.npy        (rows, dim), row-aligned with the image rows
    DIR/metadata/metadata_{N}.parquet    image_path, caption, and the sample's own fields (url, key, ...)

``N`` is the partition number, zero-padded to the same width in one run. Row ``r`` of
``metadata_{N}`` describes row ``r`` of both npy shards of ``N``. Either npy folder may be absent
(an image-only or text-only run); the metadata folder is always there. The npy shards are
memory-mapped and the parquet files streamed, batch by batch: nothing is loaded whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.core.errors import InputError
from retrieval.sources.items import CaptionRecord, ImageRef, ItemError

KINDS = {"image": ("img_emb", "img_emb_"), "text": ("text_emb", "text_emb_")}  # kind -> (folder, file prefix)
METADATA = ("metadata", "metadata_")
PATH_COLUMN, CAPTION_COLUMN = "image_path", "caption"
BATCH_ROWS = 8192


@dataclass(frozen=True)
class EmbeddingPart:
    """One partition: its metadata file, its npy shards (None where that kind was not embedded), its row count."""

    number: int
    metadata: Path
    shards: dict[str, Path | None]
    rows: int
    start: int  # global row number of its first row


@dataclass
class EmbeddingFolder:
    """A checked clip-retrieval embedding folder: partitions in order, the dimension of each kind present."""

    root: Path
    parts: list[EmbeddingPart]
    dims: dict[str, int]

    @property
    def rows(self) -> int:
        return sum(part.rows for part in self.parts)

    def kinds(self) -> list[str]:
        """``image`` and/or ``text``: the kinds that were embedded."""
        return [kind for kind in KINDS if kind in self.dims]

    def vectors(self, kind: str, rows: np.ndarray) -> tuple[np.ndarray, list[tuple[Path, int]]]:
        """The float32 rows ``rows`` (global numbers, ascending) of ``kind``, and (file, local row) of each."""
        out = np.zeros((len(rows), self.dims[kind]), np.float32)
        where: list[tuple[Path, int]] = []
        done = 0
        for part in self.parts:
            local = rows[(rows >= part.start) & (rows < part.start + part.rows)] - part.start
            if not len(local):
                continue
            path = part.shards[kind]
            if path is None:
                raise InputError(f"{part.metadata}: this partition has no {kind} embeddings")
            out[done : done + len(local)] = np.asarray(open_npy(path)[local], np.float32)
            where.extend((path, int(r)) for r in local)
            done += len(local)
        return out, where


@dataclass
class EmbeddedRows:
    """Items of an embedding folder and the global row of each one's vector."""

    images: list[ImageRef] = field(default_factory=list)
    image_rows: list[int] = field(default_factory=list)
    captions: list[CaptionRecord] = field(default_factory=list)
    caption_rows: list[int] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)


def open_npy(path: Path) -> np.ndarray:
    """A memory-mapped npy shard, checked to be (rows, dim) floats; anything else is an InputError naming it."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy array ({e})") from None
    if (
        not isinstance(array, np.ndarray)
        or array.ndim != 2
        or not np.issubdtype(array.dtype, np.floating)
        or array.shape[1] < 1
    ):
        raise InputError(
            f"{path}: a {getattr(array, 'dtype', '?')} array of shape {getattr(array, 'shape', '?')}; "
            "expected (rows, dim) float vectors"
        )
    return array


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    """``{N: path}`` of the files ``prefix{N}suffix`` in ``folder``; two files with one number are an error."""
    pattern = re.compile(rf"^{re.escape(prefix)}([0-9]+){re.escape(suffix)}$")
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if match:
            number = int(match.group(1))
            if number in found:
                raise InputError(f"{path}: partition {number} twice (also {found[number].name})")
            found[number] = path
    return found


def _metadata_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # pyarrow raises several kinds for a damaged footer
        raise InputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None


def open_embedding_folder(root: str | Path) -> EmbeddingFolder:
    """Find and check the partitions of ``root``: every shard present, row counts that agree, one dimension per kind."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such directory (expected clip-retrieval's img_emb/, text_emb/ and metadata/)")
    if not (root / METADATA[0]).is_dir():
        raise InputError(f"{root / METADATA[0]}: missing; an embedding folder has metadata/metadata_N.parquet")
    metadata = _numbered(root / METADATA[0], METADATA[1], ".parquet")
    if not metadata:
        raise InputError(f"{root / METADATA[0]}: no metadata_N.parquet files")
    shards = {
        kind: _numbered(root / folder, prefix, ".npy")
        for kind, (folder, prefix) in KINDS.items()
        if (root / folder).is_dir()
    }
    if not any(shards.values()):
        raise InputError(f"{root}: no img_emb/img_emb_N.npy or text_emb/text_emb_N.npy files")
    parts: list[EmbeddingPart] = []
    dims: dict[str, int] = {}
    start = 0
    for number, meta_path in sorted(metadata.items()):
        rows = _metadata_rows(meta_path)
        found: dict[str, Path | None] = {kind: None for kind in KINDS}
        for kind, by_number in shards.items():
            if number not in by_number:
                folder, prefix = KINDS[kind]
                raise InputError(
                    f"{root / folder / f'{prefix}{number}.npy'}: missing ({meta_path.name} has no {kind} embeddings)"
                )
            array = open_npy(by_number[number])
            if len(array) != rows:
                raise InputError(
                    f"{by_number[number]}: {len(array)} rows, but {meta_path}: {rows} rows; "
                    "the embeddings and the metadata must have one row per sample"
                )
            dim = dims.setdefault(kind, array.shape[1])
            if array.shape[1] != dim:
                raise InputError(f"{by_number[number]}: dimension {array.shape[1]}, the other {kind} shards have {dim}")
            found[kind] = by_number[number]
        parts.append(EmbeddingPart(number, meta_path, found, rows, start))
        start += rows
    for by_number in shards.values():
        for number in sorted(set(by_number) - set(metadata)):
            raise InputError(f"{by_number[number]}: no {METADATA[1]}{number}.parquet in {root / METADATA[0]} for it")
    return EmbeddingFolder(root, parts, dims)


def metadata_batches(part: EmbeddingPart) -> Iterator[list[dict[str, Any]]]:
    """The rows of one metadata file, a batch at a time; a damaged row group is an InputError naming the file."""
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(part.metadata).iter_batches(batch_size=BATCH_ROWS):
            yield batch.to_pylist()
    except InputError:
        raise
    except Exception as e:  # a corrupt page or row group: pyarrow's OSError, ArrowInvalid, ...
        raise InputError(f"{part.metadata}: cannot read its rows ({type(e).__name__}: {e})") from None


def _image_ref(uri: str, source: str, metadata: dict[str, Any]) -> ImageRef:
    """A file item when ``uri`` is a readable local file, else an item named by the uri; either way its location is
    ``uri``."""
    path = Path(uri)
    if "://" not in uri and path.is_file() and str(path) == uri:
        return ImageRef(path=path, source=source, metadata=metadata)
    return ImageRef(uri=uri, opener=lambda: open(uri, "rb"), source=source, metadata=metadata)


def gather_embedded_rows(folder: EmbeddingFolder) -> EmbeddedRows:
    """Image items (uri: ``image_path``, else ``url``; one per uri) and caption items paired with them.

    A row without ``image_path`` and ``url`` has no image; a row whose caption is null has no caption
    (how :mod:`retrieval.api.export` writes items that have no partner). The other columns are kept as
    each item's metadata.
    """
    out = EmbeddedRows()
    seen: set[str] = set()
    for part in folder.parts:
        row = part.start
        for batch in metadata_batches(part):
            for local, fields in enumerate(batch, start=row - part.start):
                _add_row(out, folder, part, local, fields, seen)
            row += len(batch)
        if row - part.start != part.rows:
            raise InputError(f"{part.metadata}: {row - part.start} rows read, its footer says {part.rows}")
    return out


def _add_row(
    out: EmbeddedRows, folder: EmbeddingFolder, part: EmbeddingPart, local: int, fields: dict[str, Any], seen: set[str]
) -> None:
    """The image and caption items of one metadata row."""
    source = str(part.metadata)
    extra = {
        key: value for key, value in fields.items() if key not in (PATH_COLUMN, CAPTION_COLUMN) and value is not None
    }
    uri = fields.get(PATH_COLUMN) or fields.get("url")
    uri = str(uri) if uri else None
    if "image" in folder.dims and uri is not None and uri not in seen:
        seen.add(uri)
        out.images.append(_image_ref(uri, source, extra))
        out.image_rows.append(part.start + local)
    if "text" not in folder.dims:
        return
    if CAPTION_COLUMN not in fields:
        raise InputError(f"{part.metadata}: no caption column, but {part.shards['text']} holds text embeddings")
    caption = fields[CAPTION_COLUMN]
    if caption is None:
        return
    if not isinstance(caption, str):
        out.errors.append(
            ItemError(source, f"caption is a {type(caption).__name__}, not text", kind="caption", row=local)
        )
        return
    out.captions.append(
        CaptionRecord(text=caption, source=source, row=local, image=uri, metadata=extra)
    )  # uri kept as a string
    out.caption_rows.append(part.start + local)
