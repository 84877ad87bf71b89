"""Load evaluation data through the embedding cache and run an evaluation (the API behind ``retrieval eval``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.asif.anchors import AnchorSet, asif_params_for, resolve_anchor_set
from retrieval.asif.relative import AsifParams
from retrieval.core.config import DEFAULT_LABEL_TEMPLATE, CaptionOptions, EncoderChoice
from retrieval.core.errors import InputError
from retrieval.embed.cache import DEFAULT_CACHE, EmbeddingCache
from retrieval.embed.pipeline import EmbedOptions
from retrieval.encoders.base import TextEncoder
from retrieval.eval.evaluate import (
    LabelledData,
    PairedData,
    RouteConfig,
    SweepResult,
    sweep,
)
from retrieval.sources.captions import read_caption_file
from retrieval.sources.discovery import labelled_folder_images
from retrieval.sources.items import ImageRef


def evenly_spaced(n: int, limit: int | None) -> np.ndarray:
    """``limit`` rows spread over ``range(n)`` (all rows when limit is None or >= n)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


@dataclass
class Encoders:
    image: Any
    text: Any
    image_cache: EmbeddingCache
    text_cache: EmbeddingCache


def open_encoders(choice: EncoderChoice, cache_dir: str | Path | None) -> Encoders:
    from retrieval.encoders.registry import load_encoders

    image, text = load_encoders(choice)
    root = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    return Encoders(image, text, EmbeddingCache(root, image), EmbeddingCache(root, text))


class CachedTextEncoder(TextEncoder):
    """A text encoder whose ``encode_texts`` goes through the embedding cache (e.g. for built-in anchor prompts)."""

    def __init__(self, encoder: TextEncoder, cache: EmbeddingCache) -> None:
        self._encoder, self._cache = encoder, cache
        self.spec, self.dim, self.device = encoder.spec, encoder.dim, encoder.device

    def fingerprint(self) -> str:
        return self._encoder.fingerprint()

    @property
    def numerics(self) -> str:
        return self._encoder.numerics

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        return self._cache.encode_texts(texts, self._encoder, progress=progress)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)


def load_paired(
    path: Path, options: CaptionOptions, encoders: Encoders, embed: EmbedOptions, limit: int | None = None
) -> tuple[PairedData, list[Path]]:
    """Images and captions of a pairs file (several captions per image allowed)."""
    parsed = read_caption_file(path, options.caption_column, options.image_column, options.template, options.encoding)
    if not parsed.is_pairs:
        raise InputError(
            f"{path}: not a pairs file (no {options.image_column!r} column); name it with `CaptionOptions.image_column`"
        )
    images = list(dict.fromkeys(Path(record.image) for record in parsed.records if record.image is not None))
    images = [images[i] for i in evenly_spaced(len(images), limit)]
    embedded = encoders.image_cache.embed_images(
        [ImageRef(path=p, source=str(path)) for p in images], encoders.image, embed
    )
    row_of = {row.ref.location: i for i, row in enumerate(embedded.rows)}
    records = [record for record in parsed.records if str(record.image) in row_of]
    captions = encoders.text_cache.encode_texts([r.text for r in records], encoders.text, progress=embed.progress)
    owner = np.array([row_of[str(r.image)] for r in records], np.int64)
    return PairedData(embedded.vectors, captions, owner), [Path(row.ref.location) for row in embedded.rows]


def load_labelled(
    root: Path, template: str, encoders: Encoders, embed: EmbedOptions, limit: int | None = None
) -> tuple[LabelledData, list[Path]]:
    """A labelled folder ``root/<label>/*`` with one prompt per class built from ``template``."""
    refs = labelled_folder_images(root)
    refs = [refs[i] for i in evenly_spaced(len(refs), limit)]
    class_names = sorted({str(ref.label) for ref in refs})  # a labelled folder labels every image
    embedded = encoders.image_cache.embed_images(refs, encoders.image, embed)
    labels = np.array([class_names.index(str(row.ref.label)) for row in embedded.rows], np.int64)
    prompts = [template.format(label=name.replace("_", " ")) for name in class_names]
    prompt_vectors = encoders.text_cache.encode_texts(prompts, encoders.text)
    evaluated = [Path(row.ref.location) for row in embedded.rows]
    return LabelledData(embedded.vectors, labels, class_names, prompt_vectors), evaluated


def check_no_leak(anchors: Sequence[AnchorSet], evaluated: Sequence[Path]) -> None:
    """Refuse an evaluation whose anchors include an evaluated image."""
    evaluated_set = {str(Path(p).resolve()) for p in evaluated}
    for anchor_set in anchors:
        overlap = evaluated_set & {str(Path(uri).resolve()) for uri in anchor_set.uris}
        if overlap:
            raise InputError(
                f"anchor set {anchor_set.name} contains {len(overlap)} evaluated images (e.g. {sorted(overlap)[0]}); "
                "evaluation would leak"
            )


def parse_sweep(values: Sequence[str]) -> dict[str, list[float]]:
    """``["k=5,10", "p=1,3"]`` -> ``{"k": [5, 10], "p": [1, 3]}``."""
    grid: dict[str, list[float]] = {}
    for value in values:
        name, _, numbers = value.partition("=")
        name = name.strip().lower()
        if name not in ("k", "p") or not numbers:
            raise InputError(f"`EvalOptions.sweep` {value!r}: expected k=N,N,... or p=X,X,...")
        try:
            grid[name] = [float(x) for x in numbers.split(",") if x.strip()]
        except ValueError as e:
            raise InputError(f"`EvalOptions.sweep` {value!r}: {e}") from e
    return grid


def route_configs(
    routes: Sequence[str],
    params: AsifParams | None,
    grid: dict[str, list[float]],
    weights: Sequence[float] | None,
    center: str = "none",
    refine: Sequence[int] = (0,),
) -> list[RouteConfig]:
    """Every (route, k, p, refinement) combination to evaluate; ``params`` fields left open are the defaults."""
    configs = []
    w = tuple(weights) if weights else None
    for route, rounds in itertools.product(routes, refine):
        if route in ("asif", "projected"):
            base_k, base_p = (params or AsifParams()).chosen()
            for k, p in itertools.product(grid.get("k", [base_k]), grid.get("p", [base_p])):
                configs.append(RouteConfig(route, AsifParams(int(k), float(p)), w, center, rounds))
        else:
            configs.append(RouteConfig(route, None, w, center if route != "clip" else "none", rounds))
    return configs


def _projected(index: Any, kind: str) -> np.ndarray:
    """The items of ``kind`` projected into the other encoder's space, as stored at build time."""
    if f"projected/{kind}" in index.manifest["files"]["vectors"]:
        return index.vector_source(f"projected/{kind}").all()
    faiss_index = index.vector_index(f"projected/{kind}")  # built before projected vectors were stored: flat
    return faiss_index.reconstruct_n(0, faiss_index.ntotal)


def evaluate_index(path: str | Path) -> dict[str, Any]:
    """Recall of an existing index on its own pairs (captions that name an indexed image), for each of its routes.

    Uses the stored vectors, relative rows and projections: nothing is encoded.
    """
    from retrieval.api.engine import open_index
    from retrieval.eval.evaluate import Scorer, evaluate_paired
    from retrieval.eval.metrics import live_pairs

    index = open_index(path)
    images, captions, owner = live_pairs(index)  # deleted items are neither queries nor candidates
    store, files, spaces = index.store, index.manifest["files"], index.manifest["spaces"]
    image_vectors = store.read_vectors(files["vectors"][f"{spaces['image']}/image"])[images]
    caption_vectors = store.read_vectors(files["vectors"][f"{spaces['caption']}/caption"])[captions]
    rows = []
    for route in index.routes:
        if route == "clip":
            scorer = Scorer(image_vectors, caption_vectors, image_vectors, caption_vectors)
        elif route == "asif":
            image_rel, caption_rel = (
                index.relative_index("image").rows[images],
                index.relative_index("caption").rows[captions],
            )
            scorer = Scorer(image_rel, caption_rel, image_rel, caption_rel)
        else:
            projected_images = _projected(index, "image")[images]
            projected_captions = _projected(index, "caption")[captions]
            scorer = Scorer(projected_images, caption_vectors, image_vectors, projected_captions)
        data = PairedData(image_vectors, caption_vectors, owner)
        rows.append({"route": route, **evaluate_paired(data, scorer)})
    anchors = [{"name": a["name"], "count": a["count"]} for a in index.manifest.get("anchors", [])]
    return {
        "task": "retrieval",
        "data": str(path),
        "encoders": {r: e["spec"] for r, e in index.manifest["encoders"].items()},
        "anchors": anchors,
        "anchor_weights": None,
        "split": None,
        "rows": rows,
        "chosen": None,
    }


@dataclass(frozen=True)
class EvalOptions:
    """What :func:`run_eval` measures, and on how much of the data; every field has a default.

    - ``routes``: how images and texts are compared (None: ``clip`` or ``asif``, by the encoders);
    - ``asif``: ASIF k and p (fields left open: the anchor sets' own); ``sweep``: a grid over them,
      e.g. ``("k=5,10,30", "p=1,3")``; ``anchor_weights``: one per anchor set when several are fused;
    - ``center``: subtract each modality's mean first (``none``, ``anchors`` or ``collection``);
    - ``refine``: rounds of label-free prototype refinement (zero-shot only; several are swept);
    - ``split``: pick the best setting on the even-numbered images, report it on the odd-numbered half;
    - ``limit``: evaluate an evenly spread subset of this many images;
    - ``cache_dir``: the embedding cache (default ``index_data/cache/embeddings``).
    """

    routes: Sequence[str] | None = None
    asif: AsifParams | None = None
    sweep: Sequence[str] = ()
    anchor_weights: Sequence[float] | None = None
    center: str = "none"
    refine: Sequence[int] = (0,)
    split: bool = False
    limit: int | None = None
    cache_dir: str | Path | None = None


def run_eval(
    data: str | Path,
    encoders: EncoderChoice,
    anchors: Sequence[str] = (),
    options: EvalOptions = EvalOptions(),
    caption_options: CaptionOptions = CaptionOptions(),
    embed: EmbedOptions = EmbedOptions(),
) -> dict[str, Any]:
    """Evaluate a pairs file (recall) or a labelled folder (zero-shot) for the chosen routes and settings."""
    data = Path(data)
    if not data.exists():
        raise InputError(f"{data}: no such file or directory")
    opened = open_encoders(encoders, options.cache_dir)
    cached_text = CachedTextEncoder(opened.text, opened.text_cache)
    anchor_sets = [resolve_anchor_set(str(a), opened.image, cached_text) for a in anchors]
    routes = options.routes if options.routes is not None else ["clip"] if encoders.is_contrastive else ["asif"]
    if not encoders.is_contrastive and "clip" in routes:
        raise InputError("route 'clip' needs a contrastive `EncoderChoice.clip`")
    dataset: PairedData | LabelledData
    if data.is_dir():
        template = caption_options.template or DEFAULT_LABEL_TEMPLATE
        dataset, evaluated = load_labelled(data, template, opened, embed, options.limit)
        task = "zero-shot"
    else:
        dataset, evaluated = load_paired(data, caption_options, opened, embed, options.limit)
        task = "retrieval"
    check_no_leak(anchor_sets, evaluated)
    grid = parse_sweep(options.sweep)
    params = options.asif
    if anchor_sets and {"asif", "projected"} & set(routes):  # k and p neither given nor swept: the anchor sets'
        chosen = params or AsifParams()
        k = int(grid["k"][0]) if grid.get("k") else chosen.k
        p = grid["p"][0] if grid.get("p") else chosen.p
        params = asif_params_for(anchor_sets, AsifParams(k=k, p=p))
    configs = route_configs(routes, params, grid, options.anchor_weights, options.center, options.refine)
    result: SweepResult = sweep(dataset, configs, anchor_sets, options.split)
    return {
        "task": task,
        "data": str(data),
        "encoders": {"image": opened.image.spec, "text": opened.text.spec},
        "anchors": [{"name": a.name, "count": len(a)} for a in anchor_sets],
        "anchor_weights": list(options.anchor_weights) if options.anchor_weights else None,
        "split": "tune on even images, report on odd" if options.split else None,
        "rows": result.rows,
        "chosen": result.chosen,
    }
