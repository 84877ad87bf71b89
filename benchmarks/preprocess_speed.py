"""Decode + preprocess throughput: the encoders' reference path vs retrieval's fast path.

    python benchmarks/preprocess_speed.py                 # about a minute on 2 cores
    python benchmarks/preprocess_speed.py --repeats 7 --imagenet 300

For each encoder (EfficientNet-Lite0, and ViT-B/32's open_clip preprocess with random weights)
and each image set, single process, files read from disk each time (OS cache warm):

* reference: ``Image.open(path).convert("RGB")`` then the encoder's reference torchvision
  transform (``encoder.reference_transform()``);
* ours: ``load_image(path, draft_size=t.draft_size)`` (hashing, EXIF orientation and all) then the
  fast transform ``t`` (``encoder.image_transform()``).

The two paths alternate within each repeat; the table shows the median seconds per image over
``--repeats`` passes and the ratio of the medians (images/s ours / reference). Torch runs with
``--threads`` intra-op threads (default 1, as in DataLoader workers; the reference's
ToTensor/Normalize are much slower with several threads on a busy machine, which would flatter
the ratio). Then the cosine between EfficientNet-Lite0 embeddings of both paths.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout
COCO = DATA / "coco-train-mini" / "images"
IMAGENET = DATA / "imagenet-sample"


def _images(folder: Path, pattern: str, limit: int) -> list[Path]:
    files = sorted(folder.glob(pattern))
    if not files:
        sys.exit(f"no images matching {folder / pattern}")
    if limit and len(files) > limit:  # an even spread, not the first classes only
        files = [files[i * len(files) // limit] for i in range(limit)]
    return files


def _large_jpegs(sources: list[Path], out: Path, size: tuple[int, int]) -> list[Path]:
    """Real photos upscaled to ``size`` and saved as quality-90 JPEGs (a camera-sized file)."""
    from PIL import Image

    made = []
    for i, src in enumerate(sources):
        img = Image.open(src).convert("RGB")
        if img.width < img.height:
            img = img.transpose(Image.Transpose.ROTATE_90)
        path = out / f"large_{i}.jpg"
        img.resize(size, Image.Resampling.LANCZOS).save(path, quality=90)
        made.append(path)
    return made


def _reference_path(transform: Callable) -> Callable[[Path], object]:
    from PIL import Image

    def run(path: Path) -> object:
        with Image.open(path) as img:
            return transform(img.convert("RGB"))

    return run


def _fast_path(transform: Callable, draft_size: tuple[int, int] | None) -> Callable[[Path], object]:
    from retrieval.sources.images import load_image

    def run(path: Path) -> object:
        return transform(load_image(path, draft_size=draft_size).image)

    return run


def _time_pair(paths: list[Path], ref: Callable, ours: Callable, repeats: int) -> tuple[float, float]:
    """Median seconds per image of each path, the two alternating within each repeat."""
    for p in paths[:3]:  # warm up caches and lazy imports
        ref(p), ours(p)
    ref_t, our_t = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for p in paths:
            ref(p)
        ref_t.append((time.perf_counter() - start) / len(paths))
        start = time.perf_counter()
        for p in paths:
            ours(p)
        our_t.append((time.perf_counter() - start) / len(paths))
    return statistics.median(ref_t), statistics.median(our_t)


def _encoders() -> list[tuple[str, Callable, object]]:
    """(name, reference transform, fast transform) per encoder family."""
    import open_clip

    from retrieval.encoders.efficientnet import build_transform
    from retrieval.encoders.preprocess import (
        efficientnet_transform,
        open_clip_transform,
    )

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    fast_clip = open_clip_transform(open_clip.get_model_preprocess_cfg(model))
    del model
    return [
        ("efficientnet-lite0", build_transform(), efficientnet_transform()),
        ("ViT-B-32 (open_clip)", preprocess, fast_clip),
    ]


def _cosines(sets: dict[str, list[Path]]) -> None:
    import torch

    from retrieval.encoders.registry import load_image_encoder

    enc = load_image_encoder("efficientnet-lite0", device="cpu")
    ref, ours = _reference_path(enc.reference_transform()), _fast_path(enc.image_transform(), enc.draft_size)
    print(f"\nEfficientNet-Lite0 embeddings, reference vs ours (draft_size={enc.draft_size}):")
    for name, paths in sets.items():
        a = enc.encode_image_tensors(torch.stack([ref(p) for p in paths]))
        b = enc.encode_image_tensors(torch.stack([ours(p) for p in paths]))
        cos = (a * b).sum(axis=1)
        pix = [
            float((ref(p) - ours(p)).abs().mean()) * 127.5
            for p in paths  # type: ignore[operator]
        ]
        print(
            f"  {name:<34} n={len(paths):<4} cosine min {cos.min():.5f}  median {np.median(cos):.5f}  "
            f"mean {cos.mean():.5f}   mean |pixel diff| {np.mean(pix):.3f}/255"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--coco", type=int, default=80, help="COCO photos (0: all)")
    parser.add_argument("--imagenet", type=int, default=200, help="ImageNet sample photos (0: all)")
    parser.add_argument("--large", type=int, default=6, help="synthetic 4000x3000 JPEGs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()

    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    coco = _images(COCO, "*.jpg", args.coco)
    imagenet = _images(IMAGENET, "*.JPEG", args.imagenet)
    big_real = [p for p in _images(IMAGENET, "*.JPEG", 0) if min(Image.open(p).size) >= 512]
    with tempfile.TemporaryDirectory() as tmp:
        large = _large_jpegs(coco[: args.large], Path(tmp), (4000, 3000))
        sets = {
            "COCO (~640x480)": coco,
            "ImageNet sample (~500x375)": imagenet,
            "synthetic 4000x3000 JPEG": large,
        }
        print(
            f"decode + preprocess, single process, torch threads={args.threads}, "
            f"median of {args.repeats} repeats; Pillow {Image.__version__}, torch {torch.__version__}"
        )
        print(f"{'encoder':<22} {'images':<28} {'n':>4} {'reference':>11} {'ours':>11} {'ours/ref img/s':>15}")
        for enc_name, ref_t, fast_t in _encoders():
            for set_name, paths in sets.items():
                r, o = _time_pair(paths, _reference_path(ref_t), _fast_path(fast_t, fast_t.draft_size), args.repeats)
                print(
                    f"{enc_name:<22} {set_name:<28} {len(paths):>4} {r * 1e3:>8.2f} ms {o * 1e3:>8.2f} ms "
                    f"{r / o:>14.2f}x"
                )
        print("transform only (COCO photos already decoded in memory, no draft):")
        for enc_name, ref_t, fast_t in _encoders():
            decoded = {p: Image.open(p).convert("RGB") for p in coco}
            r, o = _time_pair(
                coco,
                lambda p, t=ref_t, d=decoded: t(d[p]),
                lambda p, t=fast_t, d=decoded: t(d[p]),
                args.repeats,
            )
            print(
                f"{enc_name:<22} {'COCO, decoded':<28} {len(coco):>4} "
                f"{r * 1e3:>8.2f} ms {o * 1e3:>8.2f} ms {r / o:>14.2f}x"
            )
        _cosines(
            {
                "50 real photos (25 COCO + 25 ImageNet)": coco[:25] + imagenet[:25],
                "ImageNet photos >= 512 px": big_real,
                "synthetic 4000x3000 JPEG": large,
            }
        )


if __name__ == "__main__":
    main()
