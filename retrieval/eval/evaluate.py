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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from retrieval.asif.anchors import AnchorSet, AnchorSpaces, asif_params_for
from retrieval.asif.linear import LinearAlignment
from retrieval.asif.relative import AsifParams
from retrieval.core.errors import InputError
from retrieval.index.recall import recall_from_ranks

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
        return LabelledData(
            self.image_vectors[image_rows], self.labels[image_rows], self.class_names, self.prompt_vectors
        )

    @property
    def n_images(self) -> int:
        return len(self.image_vectors)


@dataclass(frozen=True)
class RouteConfig:
    """One way of comparing images and texts."""

    route: str
    params: AsifParams | None = None
    anchor_weights: tuple[float, ...] | None = None
    center: str = "none"  # none | anchors | collection (see center_spaces)
    refine: int = 0  # zero-shot only: rounds of transductive prototype refinement

    def label(self) -> str:
        label = self.route
        if self.route in ("asif", "projected") and self.params:
            label += f" k={self.params.k} p={self.params.p:g}"
        if self.center != "none":
            label += f" center={self.center}"
        if self.refine:
            label += f" refine={self.refine}"
        return label


CENTERING = ("none", "anchors", "collection")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def center_spaces(
    mode: str, image_vectors: np.ndarray, text_vectors: np.ndarray, anchors: Sequence[AnchorSet]
) -> tuple[np.ndarray, np.ndarray, list[AnchorSet]]:
    """Subtract each modality's mean before comparing (frozen encoders' features share a large common component).

    ``anchors``: anchors and items are centred by the anchors' means (inductive).
    ``collection``: as ``anchors``, but the evaluated images are centred by their own mean
    (transductive and label-free: it adapts to the collection's domain, e.g. 32-pixel thumbnails).
    """
    if mode not in CENTERING:
        raise InputError(f"unknown centering {mode!r} (`EvalOptions.center`); choose from {', '.join(CENTERING)}")
    if mode == "none" or not anchors:
        return image_vectors, text_vectors, list(anchors)
    image_mean = np.vstack([a.image_vectors for a in anchors]).mean(axis=0)
    text_mean = np.vstack([a.text_vectors for a in anchors]).mean(axis=0)
    centred = [
        AnchorSet(
            a.name,
            _unit(a.image_vectors - image_mean),
            _unit(a.text_vectors - text_mean),
            a.captions,
            a.image_encoder,
            a.text_encoder,
            a.params,
            a.uris,
        )
        for a in anchors
    ]
    own_mean = image_vectors.mean(axis=0) if mode == "collection" else image_mean
    return _unit(image_vectors - own_mean), _unit(text_vectors - text_mean), centred


@dataclass
class Scorer:
    """Both sides of a route in a common space: score(text j, image i) = images[i] . texts[j]."""

    images_for_text_queries: Matrix
    texts_as_queries: Matrix
    images_as_queries: Matrix
    texts_for_image_queries: Matrix


def make_scorer(
    config: RouteConfig, image_vectors: np.ndarray, text_vectors: np.ndarray, anchors: Sequence[AnchorSet]
) -> Scorer:
    """Put images and texts of one evaluation into the route's common space."""
    if config.route != "clip":
        image_vectors, text_vectors, anchors = center_spaces(config.center, image_vectors, text_vectors, anchors)
    if config.route == "clip":
        return Scorer(image_vectors, text_vectors, image_vectors, text_vectors)
    if not anchors:
        raise InputError(f"route {config.route!r} needs at least one anchor set")
    if config.route == "linear":
        align = LinearAlignment.fit(
            np.vstack([a.image_vectors for a in anchors]), np.vstack([a.text_vectors for a in anchors])
        )
        mapped = align.map_images(image_vectors)
        return Scorer(mapped, text_vectors, mapped, text_vectors)
    if config.route not in ROUTES:
        raise InputError(f"unknown route {config.route!r}; choose from {', '.join(ROUTES)}")
    params = asif_params_for(anchors, config.params)
    spaces = AnchorSpaces(anchors, config.anchor_weights)
    image_rel = spaces.relative(image_vectors, "image", params)
    text_rel = spaces.relative(text_vectors, "text", params)
    if config.route == "asif":
        return Scorer(image_rel, text_rel, image_rel, text_rel)
    return Scorer(spaces.project(image_rel, "text"), text_vectors, image_vectors, spaces.project(text_rel, "image"))


def score_blocks(queries: Matrix, collection: Matrix, block: int = 2048):
    """Yield (start, dense scores of queries[start:start+block] against the whole collection)."""
    for start in range(0, queries.shape[0], block):
        chunk = queries[start : start + block] @ collection.T
        yield start, (chunk.toarray() if sp.issparse(chunk) else np.asarray(chunk))


def rank_of_relevant(queries: Matrix, collection: Matrix, relevant: Callable[[int], np.ndarray]) -> np.ndarray:
    """0-based rank of the best-placed relevant item: how many irrelevant items score at least as high.

    Ties count against the query, so a route that gives many items the same score
    (e.g. all-zero relative rows) cannot look good by accident.
    """
    ranks = np.empty(queries.shape[0], np.int64)
    for start, scores in score_blocks(queries, collection):
        for offset, row in enumerate(scores):
            wanted = relevant(start + offset)
            best = row[wanted].max()
            ranks[start + offset] = int(np.sum(row >= best) - np.sum(row[wanted] >= best))
    return ranks


def recall_table(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """R@k (see :func:`retrieval.index.recall.recall_from_ranks`) and the median 1-based rank."""
    table = {f"R@{k}": float(recall_from_ranks(ranks, k).mean()) for k in ks}
    table["median_rank"] = float(np.median(ranks + 1))
    return table


def evaluate_paired(data: PairedData, scorer: Scorer, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Text -> image and image -> caption recall@k and median rank."""
    captions_of = [np.flatnonzero(data.caption_owner == i) for i in range(data.n_images)]
    t2i = rank_of_relevant(
        scorer.texts_as_queries, scorer.images_for_text_queries, lambda q: data.caption_owner[q : q + 1]
    )
    has_captions = np.array([len(c) > 0 for c in captions_of])
    image_queries = scorer.images_as_queries[np.flatnonzero(has_captions)]
    kept = [c for c in captions_of if len(c)]
    i2c = rank_of_relevant(image_queries, scorer.texts_for_image_queries, lambda q: kept[q])
    return {
        "text_to_image": recall_table(t2i, ks),
        "image_to_caption": recall_table(i2c, ks),
        "scored": {
            "text_queries": int(len(t2i)),
            "image_queries": int(len(i2c)),
            "images": data.n_images,
            "captions": int(len(data.caption_owner)),
        },
    }


def refine_prototypes(images: Matrix, prototypes: Matrix, rounds: int, keep: float = 0.5) -> np.ndarray:
    """Transductive, label-free refinement of class prototypes (a few k-means-like steps).

    Each round assigns every image to its best prototype, then moves each prototype
    to (its original direction + the mean of the most confident ``keep`` fraction
    of its images), normalised. No label is used; the collection itself is.
    """
    images = images.toarray() if sp.issparse(images) else np.asarray(images)
    start = _unit(prototypes.toarray() if sp.issparse(prototypes) else np.asarray(prototypes))
    current = start
    for _ in range(rounds):
        scores = images @ current.T
        assigned, confidence = scores.argmax(axis=1), scores.max(axis=1)
        moved = []
        for c in range(len(start)):
            members = np.flatnonzero(assigned == c)
            top = (
                members[np.argsort(-confidence[members])[: max(1, int(len(members) * keep))]]
                if len(members)
                else members
            )
            mean = (
                _unit(images[top].mean(axis=0, keepdims=True))[0] if len(top) else np.zeros(start.shape[1], np.float32)
            )
            moved.append(start[c] + mean)
        current = _unit(np.stack(moved))
    return current


def evaluate_zero_shot(data: LabelledData, scorer: Scorer, refine: int = 0) -> dict[str, Any]:
    """Top-1 / top-5 accuracy of classifying each image by its best-scoring class prompt, and the confusion."""
    n_classes = len(data.class_names)
    predictions = np.empty(data.n_images, np.int64)
    ranks = np.empty(data.n_images, np.int64)
    prototypes = scorer.texts_for_image_queries
    if refine:
        prototypes = refine_prototypes(scorer.images_as_queries, prototypes, refine)
    for start, scores in score_blocks(scorer.images_as_queries, prototypes):
        predictions[start : start + len(scores)] = scores.argmax(axis=1)
        gold = scores[np.arange(len(scores)), data.labels[start : start + len(scores)]]
        ranks[start : start + len(scores)] = np.sum(scores >= gold[:, None], axis=1) - 1  # ties count against
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
    if isinstance(data, PairedData):
        if config.refine:
            raise InputError("prototype refinement (`EvalOptions.refine`) applies to zero-shot classification only")
        result = evaluate_paired(data, scorer)
    else:
        result = evaluate_zero_shot(data, scorer, config.refine)
    settings = {"k": config.params.k, "p": config.params.p} if config.params else {}
    return {"route": config.label(), **settings, "center": config.center, "refine": config.refine, **result}


def headline(result: dict[str, Any]) -> float:
    """One number to pick settings by: mean of the reported recalls or top-1/top-5 accuracy."""
    if "top1" in result:
        return result["top1"]
    values = [
        v for task in ("text_to_image", "image_to_caption") for key, v in result[task].items() if key.startswith("R@")
    ]
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
