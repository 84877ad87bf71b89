"""Pick ASIF's k and p for small anchor sets from data, with honest tuning.

Embeds (once, cached under index_data/cache/) the 80 COCO photos and their 400
captions from ../shared/data with EfficientNet-Lite0 + MiniLM, and two anchor
sets: the 1,000 ImageNet sample photos captioned "a photo of a {class_name}",
and the built-in classifier anchors (builtin:imagenet). COCO is split by image
into two halves: k and p are chosen on the tuning half and reported on the
other half (and the paper's k=800, p=8 beside them).

    python benchmarks/asif_params.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from retrieval.asif.anchors import builtin_imagenet, embed_pairs, read_pairs
from retrieval.asif.relative import AnchorSpace, AsifParams, SparseRelativeIndex
from retrieval.core.config import CaptionOptions
from retrieval.embed.pipeline import EmbedOptions
from retrieval.encoders.registry import load_image_encoder, load_text_encoder
from retrieval.eval.metrics import first_relevant_rank, recall_at_k

CACHE = Path("index_data/cache")
KS = (1, 3, 5, 10, 20, 30, 50, 100, 200, 800)
PS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)


def cached(name: str, compute):
    """Arrays cached as .npz under index_data/cache (the encoders never change between runs)."""
    path = CACHE / f"{name}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    arrays = compute()
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def coco_embeddings(data: Path, image_encoder, text_encoder) -> dict[str, np.ndarray]:
    def compute():
        records, _ = read_pairs([data / "coco-train-mini" / "captions.jsonl"], CaptionOptions())
        refs, image_vectors, _, kept, errors = embed_pairs(
            records, image_encoder, text_encoder, EmbedOptions(progress=True)
        )
        assert not errors, errors
        texts = [r.text for captions in kept for r in captions]
        owner = [i for i, captions in enumerate(kept) for _ in captions]
        return {"images": image_vectors, "captions": text_encoder.encode_texts(texts), "owner": np.array(owner)}

    return cached("coco", compute)


def imagenet_photo_anchors(data: Path, image_encoder, text_encoder) -> dict[str, np.ndarray]:
    def compute():
        options = CaptionOptions(image_column="file", template="a photo of a {class_name}")
        records, _ = read_pairs([data / "imagenet-sample" / "labels.csv"], options)
        _, image_vectors, text_vectors, _, errors = embed_pairs(
            records, image_encoder, text_encoder, EmbedOptions(progress=True)
        )
        assert not errors, errors
        return {"image": image_vectors, "text": text_vectors}

    return cached("imagenet_photo_anchors", compute)


def evaluate(space: AnchorSpace, coco: dict, image_rows: np.ndarray, params: AsifParams) -> dict[str, float]:
    """Recall within the given subset of COCO images (and their captions)."""
    caption_rows = np.flatnonzero(np.isin(coco["owner"], image_rows))
    image_rel = space.relative(coco["images"][image_rows], "image", params)
    caption_rel = space.relative(coco["captions"][caption_rows], "text", params)
    local = {int(g): i for i, g in enumerate(image_rows)}
    owner = np.array([local[int(o)] for o in coco["owner"][caption_rows]])
    _, image_hits = SparseRelativeIndex(image_rel).search(caption_rel, 10)
    t2i = recall_at_k(first_relevant_rank(image_hits, [{o} for o in owner]), (1, 5, 10))
    _, caption_hits = SparseRelativeIndex(caption_rel).search(image_rel, 10)
    i2c = recall_at_k(
        first_relevant_rank(caption_hits, [set(np.flatnonzero(owner == i)) for i in range(len(image_rows))]), (1, 5)
    )
    return {"t2i@1": t2i[1], "t2i@5": t2i[5], "t2i@10": t2i[10], "i2c@1": i2c[1], "i2c@5": i2c[5]}


def objective(scores: dict[str, float]) -> float:
    return scores["t2i@1"] + scores["t2i@5"] + scores["t2i@10"] + scores["i2c@1"] + scores["i2c@5"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    image_encoder = load_image_encoder("efficientnet-lite0", device="cpu")
    text_encoder = load_text_encoder("minilm", device="cpu")
    coco = coco_embeddings(args.data, image_encoder, text_encoder)
    photos = imagenet_photo_anchors(args.data, image_encoder, text_encoder)
    builtin = builtin_imagenet(image_encoder, text_encoder, texts="names")  # the texts the default k, p were tuned with
    anchor_sets = {
        "imagenet photos (1000)": AnchorSpace(photos["image"], photos["text"]),
        "builtin:imagenet (1000)": builtin.space(),
    }
    n = len(coco["images"])
    tune, report = np.arange(0, n, 2), np.arange(1, n, 2)
    results = {}
    for name, space in anchor_sets.items():
        grid = {(k, p): evaluate(space, coco, tune, AsifParams(k, p)) for k, p in itertools.product(KS, PS)}
        (best_k, best_p), best = max(grid.items(), key=lambda item: objective(item[1]))
        print(f"\n{name}: tuned on {len(tune)} COCO photos -> k={best_k}, p={best_p:g}")
        print(f"  {'setting':<22}{'split':<8}" + "".join(f"{m:>8}" for m in best))
        rows = {
            f"tuned k={best_k} p={best_p:g}": AsifParams(best_k, best_p),
            "paper k=800 p=8": AsifParams(800, 8.0),
        }
        for label, params in rows.items():
            for split, subset in (("tune", tune), ("report", report)):
                scores = evaluate(space, coco, subset, params)
                print(f"  {label:<22}{split:<8}" + "".join(f"{v:8.3f}" for v in scores.values()))
        results[name] = {"k": best_k, "p": best_p, "report": evaluate(space, coco, report, AsifParams(best_k, best_p))}
        print("  grid on the tuning half (objective = t2i@1+5+10 + i2c@1+5):")
        for p in PS:
            print(f"    p={p:<4g}" + "".join(f" k{k}:{objective(grid[(k, p)]):.2f}" for k in KS))
    print("\n" + json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
