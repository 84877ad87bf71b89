"""Build an index directory (and anchor directories) from images and captions.

A build is three stages, each callable on its own:

- :func:`gather_items`: sources (image paths, caption files) -> items (:class:`Collection`);
- :func:`embed_items`: items -> vectors (:class:`~retrieval.embed.embedded.EmbeddedItems`),
  resumable inside an index directory;
- :func:`retrieval.api.write.write_index` / :func:`~retrieval.api.write.commit_index`:
  vectors -> a committed index directory.

:func:`build_index` composes them under the directory's writer lock.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from retrieval.api.write import NEED_ANCHORS, WriteOptions, commit_index, prepare_target, write_index
from retrieval.asif.anchors import (
    AnchorSet,
    AnchorSpaces,
    asif_params_for,
    build_anchor_set,
    resolve_anchor_set,
    save_anchor_set,
)
from retrieval.asif.relative import AsifParams
from retrieval.core.config import CaptionOptions, EncoderChoice, IndexOptions
from retrieval.core.errors import InputError
from retrieval.embed.embedded import EmbeddedImages, EmbeddedItems, EmbedStats
from retrieval.embed.pipeline import EmbedOptions, embed_images
from retrieval.embed.views import VIEW_SETS, embed_views
from retrieval.encoders.base import ImageEncoder, TextEncoder
from retrieval.encoders.registry import load_encoders
from retrieval.sources.captions import read_caption_file
from retrieval.sources.inputs import read_image_sources
from retrieval.sources.items import CaptionRecord, ImageRef, ItemError
from retrieval.sources.webdataset_tar import ShardItems
from retrieval.store.locking import writer_lock
from retrieval.store.provenance import encoder_record

if TYPE_CHECKING:
    from retrieval.api.engine import Index
    from retrieval.embed.ray_cluster import RayOptions

__all__ = [
    "DEFAULT_INDEX",
    "BuildOptions",
    "Collection",
    "WriteOptions",
    "build_anchors",
    "build_index",
    "commit_index",
    "embed_items",
    "gather_items",
    "resolve_anchors",
    "write_index",
]

DEFAULT_INDEX = Path("index_data") / "default"


@dataclass
class Collection:
    """The images and captions of one build, with the problems met while reading them.

    ``images`` may be file items or items that open their bytes elsewhere (see ``ImageRef``).
    """

    images: list[ImageRef] = field(default_factory=list)
    captions: list[CaptionRecord] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)


@dataclass(frozen=True)
class BuildOptions:
    """How a build reads, describes and indexes its items; every field has a working default.

    - ``caption_options``: how caption and pairs files are read;
    - ``index_options``: which vector indexes are made (type, memory budget, target recall, shards);
    - ``asif``: ASIF k and p with unimodal encoders (fields left open: the anchor sets' own);
      ``anchor_weights``: one weight per anchor set when several are fused;
    - ``image_views``: ``"five"`` (ASIF only) describes each image by the mean of the relative rows of
      the whole photo, its four quadrants and a centre crop (six encoder passes per image; image
      queries are pooled the same way), recorded in the manifest;
    - ``ray``: ``local``, ``auto``, a cluster address or ``RayOptions``: the images are embedded on
      Ray (``retrieval[ray]``); the index is the same as without it.
    """

    caption_options: CaptionOptions = CaptionOptions()
    index_options: IndexOptions = IndexOptions()
    asif: AsifParams | None = None
    anchor_weights: Sequence[float] | None = None
    image_views: str = "none"
    ray: str | RayOptions | None = None

    def __post_init__(self) -> None:
        if self.image_views not in VIEW_SETS:
            raise InputError(
                f"`BuildOptions.image_views` must be one of {', '.join(VIEW_SETS)}, got {self.image_views!r}"
            )


def gather_items(
    images: Sequence[str | Path],
    captions: Sequence[str | Path],
    options: CaptionOptions = CaptionOptions(),
    progress: bool = False,
) -> Collection:
    """Stage 1: find images and read caption files; images named by pairs files join the image collection.

    ``images`` may name image files, folders and globs (an img2dataset ``files`` folder brings
    its captions and json metadata), webdataset tar shards and parquet files with image bytes
    (a path, glob or brace range ``shards/{00000..00127}.tar``: their captions come along,
    paired with their images by uri); see :func:`retrieval.sources.inputs.read_image_sources`.
    ``progress``: a progress bar on stderr while many shards are scanned (shown after a second).
    """
    if not images and not captions:
        raise InputError("nothing to index: give `images` and/or `captions`")
    found = (
        read_image_sources(images, options.caption_column, options.image_column, progress) if images else ShardItems()
    )
    collection = Collection(images=found.images, captions=found.captions, errors=found.errors)
    seen = {ref.path for ref in collection.images if ref.path is not None}
    for path in captions:
        parsed = read_caption_file(
            path, options.caption_column, options.image_column, options.template, options.encoding
        )
        collection.captions.extend(parsed.records)
        collection.errors.extend(parsed.errors)
        for record in parsed.records:
            image = Path(record.image) if record.image is not None else None  # a caption file's images are paths
            if image is not None and image not in seen:
                seen.add(image)
                collection.images.append(ImageRef(path=image, source=str(path)))
    return collection


def embed_items(
    collection: Collection,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    options: EmbedOptions = EmbedOptions(),
    work_dir: str | Path | None = None,
    ray: RayOptions | None = None,
    image_views: str = "none",
) -> EmbeddedItems:
    """Stage 2: images and captions through their encoders (the same object for a contrastive model).

    With ``work_dir`` (an index directory whose writer lock the caller holds) the image
    embedding is resumable: see :func:`retrieval.embed.pipeline.embed_images`. With ``ray``
    (and ``work_dir``) the images are embedded on a Ray cluster in resumable units: see
    :func:`retrieval.embed.ray_pipeline.embed_images_on_ray`. With ``image_views`` other than
    ``"none"`` the crops of each embedded image are embedded too (``view_vectors``).
    """
    started = time.perf_counter()
    if ray is not None:
        from retrieval.embed.ray_pipeline import embed_images_on_ray

        if work_dir is None:
            raise InputError("a Ray build needs the index directory for its work units")
        images = embed_images_on_ray(collection.images, image_encoder, options, work_dir, ray)
    else:
        images = embed_images(collection.images, image_encoder, options, work_dir=work_dir)
    seconds = time.perf_counter() - started
    texts = [record.text for record in collection.captions]
    caption_vectors = (
        text_encoder.encode_texts(texts, progress=options.progress)
        if texts
        else np.zeros((0, text_encoder.dim), np.float32)
    )
    stats = EmbedStats(
        images_per_second=_images_per_second(images, len(collection.images), seconds),
        resumed=images.resumed,
        device=image_encoder.device,
        workers=images.workers,
        replicas=images.replicas,
        decode=images.decode_device or "cpu",
        startup_seconds=images.startup_seconds,
        steady_images_per_second=images.steady_images_per_second,
    )
    return EmbeddedItems(
        images=images.rows,
        image_vectors=images.vectors,
        captions=list(collection.captions),
        caption_vectors=caption_vectors,
        encoders={"image": encoder_record(image_encoder), "text": encoder_record(text_encoder)},
        shared_space=image_encoder is cast(object, text_encoder),  # one contrastive model: both kinds
        errors=collection.errors + images.errors,
        stats=stats,
        view_vectors=None
        if image_views == "none"
        else embed_views([row.ref for row in images.rows], image_encoder, image_views),
    )


def resolve_anchors(
    anchors: Sequence[str | Path],
    weights: Sequence[float] | None,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
) -> AnchorSpaces | None:
    """The anchor sets named by ``anchors`` (directories or ``builtin:NAME``), checked against the encoders."""
    sets = [resolve_anchor_set(str(a), image_encoder, text_encoder) for a in anchors]
    return AnchorSpaces(sets, weights) if sets else None


def build_index(
    images: Sequence[str | Path] = (),
    captions: Sequence[str | Path] = (),
    index: str | Path = DEFAULT_INDEX,
    encoders: EncoderChoice | None = None,
    anchors: str | Path | Sequence[str | Path] | None = None,
    embed: EmbedOptions = EmbedOptions(),
    options: BuildOptions = BuildOptions(),
) -> Index:
    """Embed images and captions and write an index directory; returns the opened index.

    With a contrastive ``encoders.clip`` model both kinds share one space. With
    unimodal ``encoders.image`` + ``encoders.text``, ``anchors`` (a directory from
    :func:`build_anchors` or ``builtin:imagenet``, or a list of them fused with
    ``options.anchor_weights``) is required and cross-modal search goes through ASIF
    relative representations (exact sparse route ``asif``) or their dense
    projections (route ``projected``). ``embed``: how the embedding stage runs;
    ``options``: everything else (:class:`BuildOptions`).
    """
    from retrieval.api.engine import open_index

    started = time.perf_counter()
    if encoders is None:
        raise InputError("choose encoders: EncoderChoice(clip=...) or EncoderChoice(image=..., text=...)")
    anchors = _check_choice(encoders, anchors, options.image_views)
    ray = ray_options_for(options.ray, encoders)
    index = Path(index)
    prepare_target(index)
    with writer_lock(index):  # one build at a time: a second writer fails here, at once
        collection = gather_items(images, captions, options.caption_options, progress=embed.progress)
        image_encoder, text_encoder = load_encoders(encoders)
        spaces = resolve_anchors(anchors, options.anchor_weights, image_encoder, text_encoder)
        asif = asif_params_for(spaces.sets, options.asif) if spaces else options.asif  # fails early
        with _one_ray_session(ray):  # the embed and index stages share it (each would start its own)
            embedded = embed_items(  # resumable: see resume.py
                collection, image_encoder, text_encoder, embed, index, ray, options.image_views
            )
            commit_index(
                embedded,
                index,
                WriteOptions(
                    anchors=spaces,
                    asif=asif,
                    index_options=options.index_options,
                    caption_options=options.caption_options,
                    sources={"images": [str(p) for p in images], "captions": [str(p) for p in captions]},
                    checkpoint=encoders.checkpoint,
                    progress=embed.progress,
                    started=started,
                    ray=ray,
                    image_views=options.image_views,
                ),
            )
    return open_index(index, device=encoders.device)


def _one_ray_session(ray: RayOptions | None) -> Any:
    """A Ray session open for the whole build when it runs on Ray (started or joined once), else nothing."""
    if ray is None:
        return nullcontext()
    from retrieval.embed.ray_pipeline import ray_session

    return ray_session(ray)


def ray_options_for(ray: str | RayOptions | None, encoders: EncoderChoice | None) -> RayOptions | None:
    """``ray`` (``local``, ``auto``, an address or RayOptions) as RayOptions carrying ``encoders`` (None: no Ray)."""
    if ray is None:
        return None
    from dataclasses import replace

    from retrieval.embed.ray_cluster import RayOptions

    options = ray if isinstance(ray, RayOptions) else RayOptions(address=str(ray))
    return replace(options, encoders=encoders)


def _check_choice(
    encoders: EncoderChoice, anchors: str | Path | Sequence[str | Path] | None, image_views: str = "none"
) -> list[str | Path]:
    """The anchor references as a list; errors for missing anchors, or image views they cannot pool."""
    anchors = [anchors] if isinstance(anchors, (str, Path)) else list(anchors or ())
    if encoders.is_contrastive and image_views != "none":
        raise InputError(
            f"`BuildOptions.image_views` {image_views!r} pools ASIF relative rows: it needs unimodal encoders "
            "and anchors"
        )
    if not encoders.is_contrastive and not anchors:
        raise InputError(NEED_ANCHORS)
    return anchors


def _images_per_second(embedded: EmbeddedImages, total: int, seconds: float) -> float | None:
    """Embedding speed of this run; a resumed run counts only the images it embedded itself."""
    if embedded.resumed:
        fresh = total - embedded.resumed
        return round(fresh / seconds, 2) if fresh and seconds > 0 else None
    return round(len(embedded.rows) / seconds, 2) if embedded.rows else None


def build_anchors(
    pairs: Sequence[str | Path],
    out: str | Path,
    encoders: EncoderChoice,
    caption_options: CaptionOptions = CaptionOptions(),
    embed: EmbedOptions = EmbedOptions(),
    asif: AsifParams | None = None,
    cache_dir: str | Path | None = None,
) -> AnchorSet:
    """Embed (image, caption) pairs with the two unimodal ``encoders`` and save them as an anchor directory.

    ``asif``: the k and p recorded as the set's defaults (fields left open: the library's). With
    ``cache_dir``, embeddings are reused from (and added to) the embedding cache.
    """
    from retrieval.asif.anchors import DEFAULT_PARAMS, load_anchor_set

    if encoders.is_contrastive:
        raise InputError(
            "anchor pairs bridge two unimodal encoders: give `EncoderChoice.image` and `EncoderChoice.text`, "
            "not `EncoderChoice.clip`"
        )
    out = Path(out)
    prepare_target(out, "out")
    with writer_lock(out):
        image_model, text_model = load_encoders(encoders)
        params = (asif or AsifParams()).resolved(DEFAULT_PARAMS)
        anchor_set, errors = build_anchor_set(pairs, image_model, text_model, caption_options, embed, params, cache_dir)
        save_anchor_set(anchor_set, out, errors)
    return load_anchor_set(out)
