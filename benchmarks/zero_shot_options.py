"""Which zero-shot options help EfficientNet-Lite0 + MiniLM + the built-in ImageNet anchors, measured honestly.

Options: the anchors' texts (``names``: "a photo of a {class}.", ``glosses``: "{class}: {WordNet
gloss}", ``hypernyms``: "a photo of a {class}, a kind of {hypernym}.", and the mean of the three)
crossed with the image views (``none``: the whole photo; ``five``: mean relative row of the
whole photo, its quadrants and centre crop). COCO's 80 photos are split by image into two halves
of 40; k and p are tuned (k in 50/100/200, p in 1..4, objective t2i R@1+5+10 + i2c R@1+5) on one
half and reported on the other, both ways round, and the two held-out results averaged.
Then CIFAR-10 zero-shot (50 test images per class, prompts "a photo of a {label}", whole
images: their 16-pixel quadrants say little) for each anchor text, tuned and reported the same way.
Embeddings are computed once and cached under index_data/cache/.

    python benchmarks/zero_shot_options.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from asif_params import cached  # the same .npz cache under index_data/cache

from retrieval.asif.anchors import class_prompts
from retrieval.asif.pooling import pool_views
from retrieval.asif.relative import AnchorSpace, AsifParams
from retrieval.asif.wordnet import imagenet_wordnet
from retrieval.embed.views import encode_views
from retrieval.encoders.registry import load_image_encoder, load_text_encoder
from retrieval.eval.evaluate import PairedData, Scorer, evaluate_paired
from retrieval.sources.images import load_image

GRID = [(k, p) for k in (50, 100, 200) for p in (1.0, 2.0, 3.0, 4.0)]
METRICS = ("t2i R@1", "t2i R@5", "t2i R@10", "i2c R@1", "i2c R@5")


def coco_views(data: Path, image_encoder, text_encoder) -> dict[str, np.ndarray]:
    """Six views of each COCO photo, its captions' vectors and the caption -> photo owner rows."""

    def compute():
        records = [json.loads(line) for line in (data / "coco-train-mini" / "captions.jsonl").read_text().splitlines()]
        images = list(dict.fromkeys(r["image"] for r in records))
        pictures = [load_image(data / "coco-train-mini" / name).image for name in images]
        views = np.concatenate(
            [encode_views(pictures[i : i + 8], image_encoder, "five") for i in range(0, len(pictures), 8)]
        )
        captions = text_encoder.encode_texts([r["caption"] for r in records])
        return {"views": views, "captions": captions, "owner": np.array([images.index(r["image"]) for r in records])}

    return cached("coco_views", compute)


def anchor_texts(image_encoder, text_encoder) -> dict[str, np.ndarray]:
    def compute():
        _, names = image_encoder.classifier_anchors()
        hypernyms = [
            f"a photo of a {n}, a kind of {c.hypernym[0] if c.hypernym else 'thing'}."
            for n, c in zip(names, imagenet_wordnet(), strict=True)
        ]
        texts = {kind: [p[0] for p in class_prompts(names, kind)] for kind in ("names", "glosses")}
        return {kind: text_encoder.encode_texts(t) for kind, t in {**texts, "hypernyms": hypernyms}.items()}

    arrays = cached("imagenet_anchor_texts", compute)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    arrays = {k: unit(v) for k, v in arrays.items()}
    arrays["names+glosses+hypernyms"] = unit(arrays["names"] + arrays["glosses"] + arrays["hypernyms"])
    return arrays


def scores(space: AnchorSpace, coco: dict, views: str, params: AsifParams, half: int) -> np.ndarray:
    """Held-in metrics of one half (even or odd photos) for one setting."""
    photos = np.arange(half, len(coco["views"]), 2)
    chosen = coco["views"][photos] if views == "five" else coco["views"][photos, :1]
    n, per, dim = chosen.shape
    image_rows = pool_views(space.relative(chosen.reshape(n * per, dim), "image", params), per)
    keep = np.flatnonzero(np.isin(coco["owner"], photos))
    text_rows = space.relative(coco["captions"][keep], "text", params)
    owner = np.searchsorted(photos, coco["owner"][keep])
    result = evaluate_paired(
        PairedData(np.zeros((n, 1)), np.zeros((len(keep), 1)), owner),
        Scorer(image_rows, text_rows, image_rows, text_rows),
    )
    t, i = result["text_to_image"], result["image_to_caption"]
    return np.array([t["R@1"], t["R@5"], t["R@10"], i["R@1"], i["R@5"]])


def cifar(data: Path, image_encoder, text_encoder) -> dict[str, np.ndarray]:
    def compute():
        root = data / "cifar10-test" / "test"
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        files = [(c, f) for c, name in enumerate(classes) for f in sorted((root / name).iterdir())[::20][:50]]
        images = image_encoder.encode_images([load_image(f).image for _, f in files])
        prompts = text_encoder.encode_texts([f"a photo of a {name}" for name in classes])
        return {"images": images, "labels": np.array([c for c, _ in files]), "prompts": prompts}

    return cached("cifar_500", compute)


def zero_shot(space: AnchorSpace, data: dict, params: AsifParams, half: int) -> float:
    rows = np.arange(half, len(data["images"]), 2)
    scores = (
        space.relative(data["images"][rows], "image", params) @ space.relative(data["prompts"], "text", params).T
    ).toarray()
    return float(np.mean(scores.argmax(axis=1) == data["labels"][rows]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    image_encoder, text_encoder = (
        load_image_encoder("efficientnet-lite0", device="cpu"),
        load_text_encoder("minilm", device="cpu"),
    )
    coco = coco_views(args.data, image_encoder, text_encoder)
    prototypes, _ = image_encoder.classifier_anchors()
    print(
        f"{'texts':<24}{'views':<6}{'tuned k,p (half 0 / half 1)':<30}"
        + "".join(f"{m:>9}" for m in METRICS)
        + "     mean"
    )
    for texts, vectors in anchor_texts(image_encoder, text_encoder).items():
        space = AnchorSpace(prototypes, vectors)
        for views in ("none", "five"):
            held_out, chosen = [], []
            for tune in (0, 1):
                best = max(GRID, key=lambda kp: scores(space, coco, views, AsifParams(*kp), tune).sum())
                chosen.append(f"k={best[0]} p={best[1]:g}")
                held_out.append(scores(space, coco, views, AsifParams(*best), 1 - tune))
            mean = np.mean(held_out, axis=0)
            print(
                f"{texts:<24}{views:<6}{' / '.join(chosen):<30}"
                + "".join(f"{v:9.3f}" for v in mean)
                + f"{mean.mean():9.3f}",
                flush=True,
            )
    images = cifar(args.data, image_encoder, text_encoder)
    print("\nCIFAR-10, 500 images: held-out top-1 (tuned on the other half, both ways, mean)")
    for texts, vectors in anchor_texts(image_encoder, text_encoder).items():
        space = AnchorSpace(prototypes, vectors)
        grid = [(k, p) for k in (20, 50, 100, 200) for p in (1.0, 2.0, 3.0)]
        held_out = [
            zero_shot(
                space,
                images,
                AsifParams(*max(grid, key=lambda kp: zero_shot(space, images, AsifParams(*kp), t))),
                1 - t,
            )
            for t in (0, 1)
        ]
        print(f"  {texts:<24}{np.mean(held_out):.3f}", flush=True)


if __name__ == "__main__":
    main()
