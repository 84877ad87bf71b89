"""Measure retrieval quality: paired recall and zero-shot classification, for every cross-modal route.

Routes (how an image and a text are compared):

- ``clip``: inner product in a contrastive model's shared space;
- ``asif``: exact sparse ASIF relative representations (several anchor sets are
  fused by concatenating their weighted relative spaces);
- ``projected``: an item's ASIF weights times the other modality's anchor
  vectors, a dense vector that any FAISS index can search;
- ``linear``: a ridge-regression map from image to text space fitted on the anchor pairs.

Everything is computed from embeddings (cached by content hash), so sweeps over
k and p or over routes encode nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import scipy.sparse as sp

from .anchors import AnchorSet
from .errors import InputError
from .projection import LinearAlignment, fuse_relative, project_to_modality
from .relative import AsifParams

ROUTES = ("clip", "asif", "projected", "linear")
Matrix = Any  # np.ndarray or scipy sparse matrix


@dataclass
class PairedData:
    """Images and captions where each caption names the image it describes."""

    image_vectors: np.ndarray
    caption_vectors: np.ndarray
    caption_owner: np.ndarray  # caption row -> image row

    def subset(self, image_rows: np.ndarray) -> PairedData:
        keep = np.flatnonzero(np.isin(self.caption_owner, image_rows))
        remap = {int(old): new for new, old in enumerate(image_rows)}
        return PairedData(
            self.image_vectors[image_rows],
            self.caption_vectors[keep],
            np.array([remap[int(o)] for o in self.caption_owner[keep]], np.int64),
        )

    @property
    def n_images(self) -> int:
        return len(self.image_vectors)


@dataclass
class LabelledData:
    """Images with class labels, and one prompt vector per class."""

    image_vectors: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    prompt_vectors: np.ndarray

    def subset(self, image_rows: np.ndarray) -> LabelledData:
        return LabelledData(self.image_vectors[image_rows], self.labels[image_rows], self.class_names, self.prompt_vectors)

    @property
    def n_images(self) -> int:
        return len(self.image_vectors)


@dataclass(frozen=True)
class RouteConfig:
    """One way of comparing images and texts."""

    route: str
    params: AsifParams | None = None
    anchor_weights: tuple[float, ...] | None = None

    def label(self) -> str:
        if self.route in ("asif", "projected") and self.params:
            return f"{self.route} k={self.params.k} p={self.params.p:g}"
        return self.route


@dataclass
class Scorer:
    """Both sides of a route in a common space: score(text j, image i) = images[i] . texts[j]."""

    images_for_text_queries: Matrix
    texts_as_queries: Matrix
    images_as_queries: Matrix
    texts_for_image_queries: Matrix


def make_scorer(config: RouteConfig, image_vectors: np.ndarray, text_vectors: np.ndarray, anchors: Sequence[AnchorSet]) -> Scorer:
    """Put images and texts of one evaluation into the route's common space."""
    if config.route == "clip":
        return Scorer(image_vectors, text_vectors, image_vectors, text_vectors)
    if not anchors:
        raise InputError(f"route {config.route!r} needs at least one anchor set")
    if config.route == "linear":
        align = LinearAlignment.fit(np.vstack([a.image_vectors for a in anchors]), np.vstack([a.text_vectors for a in anchors]))
        mapped = align.map_images(image_vectors)
        return Scorer(mapped, text_vectors, mapped, text_vectors)
    if config.route not in ROUTES:
        raise InputError(f"unknown route {config.route!r}; choose from {', '.join(ROUTES)}")
    params = config.params or anchors[0].params
    weights = list(config.anchor_weights or [1.0] * len(anchors))
    if len(weights) != len(anchors):
        raise InputError(f"{len(weights)} anchor weights for {len(anchors)} anchor sets")
    spaces = [a.space() for a in anchors]
    image_rel = fuse_relative([s.relative(image_vectors, "image", params) for s in spaces], weights)
    text_rel = fuse_relative([s.relative(text_vectors, "text", params) for s in spaces], weights)
    if config.route == "asif":
        return Scorer(image_rel, text_rel, image_rel, text_rel)
    scale = [np.sqrt(w / sum(weights)) for w in weights]
    text_anchors = np.vstack([s * a.text_vectors for s, a in zip(scale, anchors)])
    image_anchors = np.vstack([s * a.image_vectors for s, a in zip(scale, anchors)])
    images_in_text_space = project_to_modality(image_rel, text_anchors)
    texts_in_image_space = project_to_modality(text_rel, image_anchors)
    return Scorer(images_in_text_space, text_vectors, image_vectors, texts_in_image_space)


def score_blocks(queries: Matrix, collection: Matrix, block: int = 2048):
    """Yield (start, dense scores of queries[start:start+block] against the whole collection)."""
    for start in range(0, queries.shape[0], block):
        chunk = queries[start : start + block] @ collection.T
        yield start, (chunk.toarray() if sp.issparse(chunk) else np.asarray(chunk))


def rank_of_relevant(queries: Matrix, collection: Matrix, relevant: Callable[[int], np.ndarray]) -> np.ndarray:
    """0-based rank of the best-placed relevant item for each query (ties count in the query's favour)."""
    ranks = np.empty(queries.shape[0], np.int64)
    for start, scores in score_blocks(queries, collection):
        for offset, row in enumerate(scores):
            best = row[relevant(start + offset)].max()
            ranks[start + offset] = int(np.sum(row > best))
    return ranks


def recall_table(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    table = {f"R@{k}": float(np.mean(ranks < k)) for k in ks}
    table["median_rank"] = float(np.median(ranks + 1))
    return table


def evaluate_paired(data: PairedData, scorer: Scorer, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Text -> image and image -> caption recall@k and median rank."""
    captions_of = [np.flatnonzero(data.caption_owner == i) for i in range(data.n_images)]
    t2i = rank_of_relevant(scorer.texts_as_queries, scorer.images_for_text_queries, lambda q: data.caption_owner[q : q + 1])
    has_captions = np.array([len(c) > 0 for c in captions_of])
    image_queries = scorer.images_as_queries[np.flatnonzero(has_captions)]
    kept = [c for c in captions_of if len(c)]
    i2c = rank_of_relevant(image_queries, scorer.texts_for_image_queries, lambda q: kept[q])
    return {
        "text_to_image": recall_table(t2i, ks),
        "image_to_caption": recall_table(i2c, ks),
        "scored": {"text_queries": int(len(t2i)), "image_queries": int(len(i2c)), "images": data.n_images,
                   "captions": int(len(data.caption_owner))},
    }


def evaluate_zero_shot(data: LabelledData, scorer: Scorer) -> dict[str, Any]:
    """Top-1 / top-5 accuracy of classifying each image by its best-scoring class prompt, and the confusion."""
    n_classes = len(data.class_names)
    predictions = np.empty(data.n_images, np.int64)
    ranks = np.empty(data.n_images, np.int64)
    for start, scores in score_blocks(scorer.images_as_queries, scorer.texts_for_image_queries):
        predictions[start : start + len(scores)] = scores.argmax(axis=1)
        gold = scores[np.arange(len(scores)), data.labels[start : start + len(scores)]]
        ranks[start : start + len(scores)] = np.sum(scores > gold[:, None], axis=1)
    confusion = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(confusion, (data.labels, predictions), 1)
    per_class = {name: float(confusion[i, i] / max(confusion[i].sum(), 1)) for i, name in enumerate(data.class_names)}
    return {
        "top1": float(np.mean(ranks < 1)),
        "top5": float(np.mean(ranks < 5)),
        "scored": {"images": data.n_images, "classes": n_classes},
        "per_class_top1": per_class,
        "confusion": {"classes": data.class_names, "matrix": confusion.tolist()},
    }


def evaluate(data: PairedData | LabelledData, config: RouteConfig, anchors: Sequence[AnchorSet]) -> dict[str, Any]:
    """Score ``data`` along one route."""
    texts = data.caption_vectors if isinstance(data, PairedData) else data.prompt_vectors
    scorer = make_scorer(config, data.image_vectors, texts, anchors)
    result = evaluate_paired(data, scorer) if isinstance(data, PairedData) else evaluate_zero_shot(data, scorer)
    return {"route": config.label(), **({"k": config.params.k, "p": config.params.p} if config.params else {}), **result}


def headline(result: dict[str, Any]) -> float:
    """One number to pick settings by: mean of the reported recalls or top-1/top-5 accuracy."""
    if "top1" in result:
        return result["top1"]
    values = [v for task in ("text_to_image", "image_to_caption") for key, v in result[task].items() if key.startswith("R@")]
    return float(np.mean(values))


@dataclass
class SweepResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, Any] | None = None


def sweep(
    data: PairedData | LabelledData,
    configs: Sequence[RouteConfig],
    anchors: Sequence[AnchorSet],
    split: bool = False,
) -> SweepResult:
    """Evaluate every config. With ``split``, settings are scored on even-numbered images and the best
    one is reported on the odd-numbered half, so nothing reported was tuned on itself."""
    if not split:
        return SweepResult(rows=[evaluate(data, config, anchors) for config in configs])
    tune, report = data.subset(np.arange(0, data.n_images, 2)), data.subset(np.arange(1, data.n_images, 2))
    rows = [{**evaluate(tune, config, anchors), "split": "tune"} for config in configs]
    best = max(range(len(configs)), key=lambda i: headline(rows[i]))
    chosen = {**evaluate(report, configs[best], anchors), "split": "report"}
    return SweepResult(rows=rows, chosen=chosen)
