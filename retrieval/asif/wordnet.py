"""The WordNet 3.0 entries of the 1,000 ImageNet-1k classes, shipped as a derived table.

``data/imagenet_wordnet.tsv`` (made by ``tools/imagenet_wordnet.py``; licence in
``data/WORDNET_LICENSE``) lists, in class-index order, each class's wnid, synonyms,
gloss and first hypernym. The built-in anchors use it to describe each class in
words (see :func:`retrieval.asif.anchors.builtin_imagenet`).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from retrieval.core.errors import InputError

TABLE = "imagenet_wordnet.tsv"


@dataclass(frozen=True)
class WordnetClass:
    """One ImageNet class: ``wnid`` (``n01440764``), its WordNet synonyms, gloss and first hypernym's synonyms."""

    index: int
    wnid: str
    synonyms: tuple[str, ...]
    gloss: str
    hypernym: tuple[str, ...]


def _names(field: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in field.split(",") if name.strip())


@lru_cache(maxsize=1)
def imagenet_wordnet() -> tuple[WordnetClass, ...]:
    """The 1,000 classes in class-index order (read once from the package's table)."""
    text = resources.files("retrieval.asif").joinpath("data").joinpath(TABLE).read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    classes = tuple(
        WordnetClass(int(r["class_index"]), r["wnid"], _names(r["synonyms"]), r["gloss"], _names(r["hypernym"]))
        for r in rows
    )
    if [c.index for c in classes] != list(range(1000)) or any(not c.gloss for c in classes):
        raise InputError(f"retrieval/asif/data/{TABLE}: expected glosses of classes 0..999 in order")
    return classes
