"""Embedding throughput on CPU: our pipeline against a naive loop, and our text path against SentenceTransformer.encode.

Images: real photos from ../shared/data (COCO + ImageNet sample), for EfficientNet-Lite0 and a
CLIP-sized image tower (ViT-B/32 architecture, random weights). The naive loop opens each
image, converts it, applies the encoder's own reference transform and runs the model one image
at a time. Ours: retrieval.embed.pipeline.embed_images with its defaults (DataLoader workers that decode
and, on the CPU on Linux, encode with single-threaded encoder replicas; batches; fast
preprocessing), and the same with the encoder in the main process (--no-replicas). Embeddings
are compared (cosine). Every ratio is measured in the same run; the paths alternate within each
repeat and each timing is the median of --repeats runs.

    python benchmarks/throughput.py [--images 320] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def median_times(fns: dict, repeats: int, warmup: bool = False) -> dict[str, tuple[float, object]]:
    """Median seconds (and the last result) of each function; the functions alternate within each
    repeat, so a machine that slows down mid-run slows all of them alike. ``warmup``: one untimed
    call of each first."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, object] = {name: fn() for name, fn in fns.items()} if warmup else {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in fns}


def plain_forward(encoder):
    """The model as a user would call it: float32, default memory format, no autocast."""
    import torch

    model = encoder._model
    if hasattr(model, "encode_image"):
        return lambda x: model.encode_image(x)
    return lambda x: model.to(memory_format=torch.contiguous_format).extract_features(x).mean(dim=(2, 3))


def naive_loop(paths, encoder) -> np.ndarray:
    """Open, convert, the encoder's reference transform, one image at a time through the plain model."""
    import torch
    from PIL import Image

    transform = encoder.reference_transform()
    forward = plain_forward(encoder)
    rows = []
    for path in paths:
        with Image.open(path) as img:
            pixels = transform(img.convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            rows.append(forward(pixels)[0].float().numpy())
    rows = np.stack(rows)
    if hasattr(encoder._model, "extract_features"):  # restore the encoder's own (channels-last) layout
        encoder._model.to(memory_format=torch.channels_last)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def pipeline(refs, encoder, batch_size: int, replicas: bool | None = None) -> np.ndarray:
    from retrieval.embed.pipeline import EmbedOptions, embed_images

    options = EmbedOptions(batch_size=batch_size, workers="auto", replicas=replicas, progress=False)
    return embed_images(refs, encoder, options).vectors


def random_vit_b32(folder: Path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_check import save_random_vit_b32

    from retrieval.encoders.registry import load_clip_encoder

    return load_clip_encoder("open_clip:ViT-B-32", checkpoint=save_random_vit_b32(folder), device="cpu")


def image_rows(n: int, repeats: int, batch_size: int) -> list[dict]:
    from retrieval.encoders.registry import load_image_encoder
    from retrieval.sources.discovery import find_images

    refs = (find_images([DATA / "coco-train-mini" / "images"]) + find_images([DATA / "imagenet-sample"]))[:n]
    paths = [ref.path for ref in refs]
    encoders = {
        "efficientnet-lite0": load_image_encoder("efficientnet-lite0", device="cpu"),
        "ViT-B/32 (random weights)": random_vit_b32(Path(tempfile.mkdtemp()) / "vit"),
    }
    rows = []
    for name, encoder in encoders.items():
        timed = median_times(
            {
                "naive": partial(naive_loop, paths, encoder),
                "ours": partial(pipeline, refs, encoder, batch_size),  # the default: replicas where they apply
                "ours_main_process_encoder": partial(pipeline, refs, encoder, batch_size, replicas=False),
            },
            repeats,
        )
        naive_s, naive = timed["naive"]
        ours_s, ours = timed["ours"]
        main_s, _ = timed["ours_main_process_encoder"]
        cosine = np.sum(naive * ours, axis=1)
        rows.append(
            {
                "encoder": name,
                "images": len(paths),
                "naive_img_s": round(len(paths) / naive_s, 2),
                "ours_img_s": round(len(paths) / ours_s, 2),
                "ratio": round(naive_s / ours_s, 2),
                "ours_no_replicas_img_s": round(len(paths) / main_s, 2),
                "ratio_no_replicas": round(naive_s / main_s, 2),
                "cosine_min": round(float(cosine.min()), 4),
                "cosine_median": round(float(np.median(cosine)), 5),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def text_row(repeats: int) -> dict:
    from sentence_transformers import SentenceTransformer

    from retrieval.encoders.registry import load_text_encoder
    from retrieval.encoders.sentence_transformers import minilm_path
    from retrieval.sources.captions import read_caption_file

    texts = [r.text for r in read_caption_file(DATA / "coco-train-mini" / "captions.jsonl").records] * 5
    ours = load_text_encoder("minilm", device="cpu")
    reference = SentenceTransformer(str(minilm_path()), device="cpu")
    timed = median_times(
        {"reference": lambda: reference.encode(texts), "ours": lambda: ours.encode_texts(texts)}, repeats
    )
    (ref_s, ref), (ours_s, mine) = timed["reference"], timed["ours"]
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    row = {
        "text_encoder": "minilm",
        "captions": len(texts),
        "sentence_transformers_encode_per_s": round(len(texts) / ref_s, 1),
        "ours_per_s": round(len(texts) / ours_s, 1),
        "ratio": round(ref_s / ours_s, 3),
        "cosine_min": round(float(np.sum(ref * mine, axis=1).min()), 5),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    image_rows(args.images, args.repeats, args.batch_size)
    text_row(args.repeats)


if __name__ == "__main__":
    main()
