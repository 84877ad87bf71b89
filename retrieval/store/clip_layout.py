"""Writes clip-retrieval's index folder layout, all or nothing.

What ``clip-retrieval inference`` + ``clip-retrieval index`` leave and ``clip-retrieval back`` serves::

    OUT/img_emb/img_emb_{N}.npy   OUT/text_emb/text_emb_{N}.npy   OUT/metadata/metadata_{N}.parquet
    OUT/image.index   OUT/text.index   (FAISS, inner product; ids are metadata row numbers)
    OUT/indices_paths.json            ({"NAME": {"indice_folder": OUT, "clip_model": SPEC}}, for --indices-paths)

Everything is written into a temporary sibling folder, renamed to ``OUT`` at the end: a failed
export leaves nothing behind, and an existing ``OUT`` is never touched (it must not exist, or be empty).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.core.errors import InputError

if TYPE_CHECKING:
    import pyarrow as pa

INDICES_PATHS = "indices_paths.json"


class ClipLayoutWriter:
    """Use as a context manager: the folder appears at ``out`` only when the block ends without an error."""

    def __init__(self, out: str | Path, partitions: int) -> None:
        self.out = Path(out).absolute()
        if self.out.exists() and not (self.out.is_dir() and not any(self.out.iterdir())):
            raise InputError(f"{self.out}: exists and is not an empty directory; choose another output folder")
        self.width = len(str(max(partitions - 1, 0)))  # clip-retrieval's zero padding: one width per run
        self.tmp = self.out.parent / f".{self.out.name}.export-{uuid.uuid4().hex[:8]}.tmp"

    def __enter__(self) -> ClipLayoutWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for folder in ("img_emb", "text_emb", "metadata"):
            (self.tmp / folder).mkdir(parents=True)
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            if self.out.is_dir():
                self.out.rmdir()  # empty (checked above); a file appearing meanwhile makes this fail, not vanish
            os.replace(self.tmp, self.out)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise InputError(f"{self.out}: cannot put the export in place ({e.strerror or e})") from None

    def name(self, number: int) -> str:
        return str(number).zfill(self.width)

    def write_part(self, number: int, image: np.ndarray, text: np.ndarray, metadata: pa.Table) -> None:
        """Partition ``number``: float16 image and text rows and their metadata, row for row."""
        import pyarrow.parquet as pq

        if not (len(image) == len(text) == metadata.num_rows):
            raise ValueError(
                f"partition {number}: {len(image)} image rows, {len(text)} text rows, {metadata.num_rows} metadata rows"
            )
        np.save(
            self.tmp / "img_emb" / f"img_emb_{self.name(number)}.npy", np.asarray(image, np.float16), allow_pickle=False
        )
        np.save(
            self.tmp / "text_emb" / f"text_emb_{self.name(number)}.npy",
            np.asarray(text, np.float16),
            allow_pickle=False,
        )
        pq.write_table(metadata, self.tmp / "metadata" / f"metadata_{self.name(number)}.parquet")

    def write_faiss(self, name: str, index: Any) -> None:
        """``image.index`` or ``text.index``."""
        import faiss

        faiss.write_index(index, str(self.tmp / f"{name}.index"))

    def write_indices_paths(self, name: str, clip_model: str) -> None:
        """The entry ``clip-retrieval back --indices-paths`` reads, naming the final folder."""
        entry = {name: {"indice_folder": str(self.out), "clip_model": clip_model}}
        (self.tmp / INDICES_PATHS).write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
