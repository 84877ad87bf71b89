"""ASIF anchor sets: (image, caption) pairs embedded with a frozen image and a frozen text encoder.

An anchor set is built from pairs files or labelled folders, or taken from an
ImageNet classifier's own final layer (``builtin:imagenet``), and saved as a
reusable directory (format v1, kind ``anchors``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from retrieval.asif.relative import DEFAULT_PARAMS, AnchorSpace, AsifParams, Modality
from retrieval.core.config import DEFAULT_LABEL_TEMPLATE, CaptionOptions
from retrieval.core.errors import InputError
from retrieval.embed.pipeline import EmbedOptions, embed_images
from retrieval.encoders.base import ImageEncoder, TextEncoder
from retrieval.sources.captions import read_caption_file
from retrieval.sources.discovery import labelled_folder_pairs
from retrieval.sources.items import CaptionRecord, ImageRef, ItemError
from retrieval.store.provenance import check_same_encoder, encoder_record
from retrieval.store.reader import StoreReader
from retrieval.store.writer import StoreWriter

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_IMAGENET = "builtin:imagenet"
BUILTIN_IMAGENET_NAMES = "builtin:imagenet-names"
BUILTIN_IMAGENET_GLOSSES = "builtin:imagenet-glosses"
IMAGENET_IMAGE_ENCODERS = ("efficientnet-lite0",)
# Prompts for class-name anchors; averaged when several. One: an ensemble encodes every class once
# per template, and CLIP's templates bought nothing on COCO (benchmarks/RESULTS.md).
CLASS_PROMPTS = ("a photo of a {}.",)
# What the text side of the built-in ImageNet anchors says about each class: ``names`` the
# prompts above; ``glosses`` also WordNet's definition ("tabby: a cat with a grey or tawny coat
# mottled with black"), see retrieval/asif/wordnet.py. Measured in benchmarks/RESULTS.md.
# ``glosses`` won on both held-out halves of COCO, so plain ``builtin:imagenet`` uses it; index
# manifests from before it record no ``texts`` and meant ``names`` (see anchor_texts_of).
ANCHOR_TEXTS = ("names", "glosses")
DEFAULT_ANCHOR_TEXTS = "glosses"
BUILTIN_TEXTS = {
    BUILTIN_IMAGENET: DEFAULT_ANCHOR_TEXTS,
    BUILTIN_IMAGENET_NAMES: "names",
    BUILTIN_IMAGENET_GLOSSES: "glosses",
}


@dataclass
class AnchorSet:
    """N anchor pairs: row i of ``image_vectors`` and of ``text_vectors`` describe the same thing.

    ``params``: the ASIF k and p indexes use with these anchors unless told
    otherwise; fields left open are filled from :data:`DEFAULT_PARAMS`.
    """

    name: str
    image_vectors: np.ndarray
    text_vectors: np.ndarray
    captions: list[str]
    image_encoder: dict[str, Any]
    text_encoder: dict[str, Any]
    params: AsifParams = DEFAULT_PARAMS
    uris: list[str] = field(default_factory=list)
    texts: str = "captions"  # what the text side is: "captions" (pairs), or a built-in's ANCHOR_TEXTS

    def __post_init__(self) -> None:
        if len(self.image_vectors) != len(self.text_vectors):
            raise InputError(
                f"anchor set {self.name}: {len(self.image_vectors)} image and {len(self.text_vectors)} text vectors"
            )
        if len(self.image_vectors) == 0:
            raise InputError(f"anchor set {self.name}: no anchor pairs")
        self.params = self.params.resolved(DEFAULT_PARAMS)

    def __len__(self) -> int:
        return len(self.image_vectors)

    def space(self) -> AnchorSpace:
        """The anchor matrices, ready to compute relative representations."""
        return AnchorSpace(self.image_vectors, self.text_vectors)

    def check_encoders(self, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
        """Raise unless the given encoders are the ones these anchors were embedded with."""
        check_same_encoder(self.image_encoder, image_encoder, f"anchor set {self.name} (image side)")
        check_same_encoder(self.text_encoder, text_encoder, f"anchor set {self.name} (text side)")


def asif_params_for(sets: Sequence[AnchorSet], chosen: AsifParams | None = None) -> AsifParams:
    """The ASIF k and p to use with ``sets``: each field the caller ``chosen`` sets, else the anchor sets' own.

    Fused anchor sets share one k and one p (one relative space, one ``asif``
    entry in an index manifest). A field the caller leaves open must therefore be
    the same in every set; sets that disagree are refused with an error naming
    them, rather than one set's value being used for all.
    """
    chosen = chosen or AsifParams()
    if not sets:
        return chosen.resolved(DEFAULT_PARAMS)
    for field_name in ("k", "p"):
        values = {getattr(s.params, field_name) for s in sets}
        if getattr(chosen, field_name) is None and len(values) > 1:
            detail = ", ".join(f"{s.name} ({field_name}={getattr(s.params, field_name):g})" for s in sets)
            raise InputError(
                f"the anchor sets use different ASIF {field_name}: {detail}; choose one with `AsifParams.{field_name}`"
            )
    return chosen.resolved(sets[0].params)


class AnchorSpaces:
    """One or several anchor sets used together: their relative spaces are fused with per-set weights.

    ``relative`` gives the exact sparse ASIF rows (concatenated weighted spaces, see
    :func:`retrieval.asif.projection.fuse_relative`), with the k and p of
    :func:`asif_params_for`; ``project`` gives the dense projected route: relative
    weights times the other modality's (weighted, stacked) anchors.
    """

    def __init__(self, sets: Sequence[AnchorSet], weights: Sequence[float] | None = None) -> None:
        if not sets:
            raise InputError("no anchor set given")
        self.sets = list(sets)
        self.weights = [float(w) for w in (weights or [1.0] * len(sets))]
        if len(self.weights) != len(self.sets):
            raise InputError(f"{len(self.weights)} anchor weights for {len(self.sets)} anchor sets")
        self._spaces = [s.space() for s in self.sets]

    def relative(self, vectors: np.ndarray, modality: str, params: AsifParams | None = None) -> Any:
        from retrieval.asif.fusion import fuse_relative

        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        side = cast(Modality, modality)
        params = asif_params_for(self.sets, params)
        parts = [space.relative(vectors, side, params) for space in self._spaces]
        return parts[0] if len(parts) == 1 else fuse_relative(parts, self.weights)

    def project(self, relative_rows: Any, target_modality: str) -> np.ndarray:
        """Dense vectors in ``target_modality``'s encoder space for rows from :meth:`relative`."""
        from retrieval.asif.projection import project_to_modality

        total = sum(self.weights)
        stacked = (
            np.vstack(
                [
                    np.sqrt(w / total) * (s.text_vectors if target_modality == "text" else s.image_vectors)
                    for w, s in zip(self.weights, self.sets, strict=True)
                ]
            )
            if len(self.sets) > 1
            else (self.sets[0].text_vectors if target_modality == "text" else self.sets[0].image_vectors)
        )
        return project_to_modality(relative_rows, stacked)


def read_pairs(sources: Sequence[str | Path], options: CaptionOptions) -> tuple[list[CaptionRecord], list[ItemError]]:
    """Read (image, caption) pairs from pairs files and labelled folders (``root/<label>/*.jpg``)."""
    records: list[CaptionRecord] = []
    errors: list[ItemError] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            records.extend(labelled_folder_pairs(path, options.template or DEFAULT_LABEL_TEMPLATE))
            continue
        parsed = read_caption_file(
            path, options.caption_column, options.image_column, options.template, options.encoding
        )
        if not parsed.is_pairs:
            raise InputError(
                f"{path}: not a pairs file (no {options.image_column!r} column); name the image column with "
                "`CaptionOptions.image_column`"
            )
        records.extend(parsed.records)
        errors.extend(parsed.errors)
    if not records:
        raise InputError("no (image, caption) pairs in " + ", ".join(map(str, sources)))
    return records, errors


def group_by_image(records: Sequence[CaptionRecord]) -> dict[Path, list[CaptionRecord]]:
    """Captions per image, in order of first appearance."""
    groups: dict[Path, list[CaptionRecord]] = {}
    for record in records:
        assert record.image is not None  # read_pairs only returns paired records
        groups.setdefault(Path(record.image), []).append(record)  # pairs files name image files
    return groups


def mean_caption_vectors(groups: Sequence[list[int]], caption_vectors: np.ndarray) -> np.ndarray:
    """One L2-normalised text vector per group: the mean of its captions' vectors."""
    means = np.stack([caption_vectors[rows].mean(axis=0) for rows in groups]).astype(np.float32)
    return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


def embed_pairs(
    records: Sequence[CaptionRecord],
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    embed: EmbedOptions = EmbedOptions(),
    cache_dir: str | Path | None = None,
) -> tuple[list[ImageRef], np.ndarray, np.ndarray, list[list[CaptionRecord]], list[ItemError]]:
    """Embed pairs as one anchor per image; its text side is the mean of its captions' vectors.

    With ``cache_dir``, embeddings come from (and go to) the embedding cache.
    """
    groups = group_by_image(records)
    refs = [
        ImageRef(path=image, source=captions[0].source, label=captions[0].label) for image, captions in groups.items()
    ]
    if cache_dir is not None:
        from retrieval.embed.cache import EmbeddingCache

        image_cache, text_cache = EmbeddingCache(cache_dir, image_encoder), EmbeddingCache(cache_dir, text_encoder)
        embedded = image_cache.embed_images(refs, image_encoder, embed)
    else:
        embedded = embed_images(refs, image_encoder, embed)
    kept = [groups[Path(row.ref.location)] for row in embedded.rows]
    texts = [record.text for captions in kept for record in captions]
    if cache_dir is not None:
        caption_vectors = text_cache.encode_texts(texts, text_encoder, progress=embed.progress)
    else:
        caption_vectors = text_encoder.encode_texts(texts, progress=embed.progress)
    offsets = np.cumsum([0] + [len(captions) for captions in kept])
    text_vectors = mean_caption_vectors(
        [list(range(offsets[i], offsets[i + 1])) for i in range(len(kept))], caption_vectors
    )
    return [row.ref for row in embedded.rows], embedded.vectors, text_vectors, kept, embedded.errors


def build_anchor_set(
    sources: Sequence[str | Path],
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    options: CaptionOptions = CaptionOptions(),
    embed: EmbedOptions = EmbedOptions(),
    params: AsifParams = DEFAULT_PARAMS,
    cache_dir: str | Path | None = None,
) -> tuple[AnchorSet, list[ItemError]]:
    """Embed the pairs in ``sources`` into an anchor set (unreadable images are skipped and returned)."""
    records, errors = read_pairs(sources, options)
    refs, image_vectors, text_vectors, kept, image_errors = embed_pairs(
        records, image_encoder, text_encoder, embed, cache_dir
    )
    anchors = AnchorSet(
        name=", ".join(map(str, sources)),
        image_vectors=image_vectors,
        text_vectors=text_vectors,
        captions=[captions[0].text for captions in kept],
        image_encoder=encoder_record(image_encoder),
        text_encoder=encoder_record(text_encoder),
        params=params,
        uris=[str(ref.path) for ref in refs],
    )
    return anchors, errors + image_errors


def class_prompts(class_names: Sequence[str], texts: str = "names") -> list[list[str]]:
    """The prompts whose mean text vector stands for each ImageNet class (see :data:`ANCHOR_TEXTS`)."""
    if texts not in ANCHOR_TEXTS:
        raise InputError(f"unknown anchor texts {texts!r}; choose from {', '.join(ANCHOR_TEXTS)}")
    named = [[template.format(name) for template in CLASS_PROMPTS] for name in class_names]
    if texts == "names":
        return named
    from retrieval.asif.wordnet import imagenet_wordnet

    wordnet = imagenet_wordnet()
    if len(wordnet) != len(class_names):
        raise InputError(
            f"{len(class_names)} classifier classes, but WordNet glosses for {len(wordnet)} ImageNet classes"
        )
    return [[f"{name}: {entry.gloss}"] for name, entry in zip(class_names, wordnet, strict=True)]


def builtin_imagenet(
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    params: AsifParams = DEFAULT_PARAMS,
    texts: str = DEFAULT_ANCHOR_TEXTS,
    name: str = BUILTIN_IMAGENET,
) -> AnchorSet:
    """Anchors from an ImageNet classifier: its final-layer rows paired with texts of the 1,000 classes.

    ``texts`` (:data:`ANCHOR_TEXTS`): ``names`` pairs each row with "a photo of a {class}.",
    ``glosses`` with "{class}: {WordNet gloss}".
    """
    if not hasattr(image_encoder, "classifier_anchors"):
        raise InputError(
            f"{BUILTIN_IMAGENET} needs an ImageNet classifier as image encoder ({', '.join(IMAGENET_IMAGE_ENCODERS)}), "
            f"not {image_encoder.spec}"
        )
    prototypes, class_names = image_encoder.classifier_anchors()
    prompts = class_prompts(class_names, texts)
    prompt_vectors = text_encoder.encode_texts([p for per_class in prompts for p in per_class], progress=False)
    offsets = np.cumsum([0] + [len(per_class) for per_class in prompts])
    text_vectors = mean_caption_vectors(
        [list(range(offsets[i], offsets[i + 1])) for i in range(len(prompts))], prompt_vectors
    )
    return AnchorSet(
        name=name,
        image_vectors=np.asarray(prototypes, np.float32),
        text_vectors=text_vectors,
        captions=[per_class[0] for per_class in prompts],
        image_encoder=encoder_record(image_encoder),
        text_encoder=encoder_record(text_encoder),
        params=params,
        texts=texts,
    )


def anchor_texts_of(meta: dict[str, Any]) -> str:
    """What the text side of an index manifest's anchor entry says: its ``texts``, or what it meant before
    that was recorded (``names`` for a built-in set, ``captions`` for a directory)."""
    if meta.get("texts"):
        return str(meta["texts"])
    return "names" if str(meta.get("name", "")).startswith(BUILTIN_PREFIX) else "captions"


def list_builtin_anchor_sets() -> list[str]:
    """Names accepted by ``--anchors`` besides a directory."""
    return list(BUILTIN_TEXTS)


def save_anchor_set(anchors: AnchorSet, out: str | Path, errors: Sequence[ItemError] = ()) -> dict[str, Any]:
    """Write ``anchors`` to ``out`` as an anchor directory; returns its manifest."""
    import pyarrow as pa

    from retrieval.index.vector_index import build_vector_index

    writer = StoreWriter(out, kind="anchors")
    files = {
        "image_vectors": writer.write_array("anchors", "image", anchors.image_vectors.astype(np.float32)),
        "text_vectors": writer.write_array("anchors", "text", anchors.text_vectors.astype(np.float32)),
        "pairs": writer.write_table(
            "pairs", pa.table({"uri": anchors.uris or [""] * len(anchors), "caption": anchors.captions})
        ),
        "image_faiss": writer.write_faiss("image", build_vector_index(anchors.image_vectors)),
        "text_faiss": writer.write_faiss("text", build_vector_index(anchors.text_vectors)),
    }
    manifest = {
        "name": anchors.name,
        "count": len(anchors),
        "image_encoder": anchors.image_encoder,
        "text_encoder": anchors.text_encoder,
        "asif": anchors.params.to_json(),
        "files": files,
    }
    return writer.commit(manifest, (error.to_json() for error in errors))


def load_anchor_set(path: str | Path) -> AnchorSet:
    """Read an anchor directory written by :func:`save_anchor_set`."""
    reader = StoreReader(path, kind="anchors")
    manifest, files = reader.manifest, reader.manifest["files"]
    pairs = reader.read_table(files["pairs"]).to_pydict()
    return AnchorSet(
        name=str(path),
        image_vectors=reader.read_array(files["image_vectors"]),
        text_vectors=reader.read_array(files["text_vectors"]),
        captions=list(pairs["caption"]),
        image_encoder=manifest["image_encoder"],
        text_encoder=manifest["text_encoder"],
        params=AsifParams.from_json(manifest["asif"]),
        uris=[uri for uri in pairs["uri"] if uri],
    )


def resolve_anchor_set(reference: str, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> AnchorSet:
    """An anchor set from ``builtin:NAME`` or an anchor directory, checked against the encoders."""
    if reference.startswith(BUILTIN_PREFIX):
        if reference not in BUILTIN_TEXTS:
            raise InputError(
                f"unknown built-in anchor set {reference!r}; known: {', '.join(list_builtin_anchor_sets())}"
            )
        return builtin_imagenet(image_encoder, text_encoder, texts=BUILTIN_TEXTS[reference], name=reference)
    anchors = load_anchor_set(reference)
    anchors.check_encoders(image_encoder, text_encoder)
    return anchors
