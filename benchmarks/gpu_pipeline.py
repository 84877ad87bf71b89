"""Issue 17 section 3 in one run: does the embedding stage feed the GPU?

On a lent GPU machine, over >= 20,000 photos (the COCO + ImageNet photos of ../shared/data
repeated under distinct names, hard links where the file system allows), for ViT-B/32
(open_clip, random weights: speed does not depend on training) and EfficientNet-Lite0:

* the model alone on preloaded tensors (images/s, batch 256);
* the whole embedding stage (``embed_images``) with CPU decode (PIL in the workers) and with
  GPU decode (workers read bytes, nvJPEG decodes batches): images/s over the whole run, start-up
  (to the first batch) and steady state apart, and the share of the model-alone throughput;
* decode + preprocess alone in the workers (no model), and how it scales with workers;
* the worst cosine between the GPU-decode and CPU-decode vectors of every photo.

Prints one JSON object (also written to --out): targets of issue 17 are ViT-B/32 end to end
>= 50% of its model-alone throughput and >= 2,500 images/s. Sized to finish in ~4 minutes on
an H200 with 16 cores. ``--quick`` runs the same code on the CPU over a few hundred photos
(the batched decode then runs on the CPU), to check the script anywhere:

    python benchmarks/gpu_pipeline.py [--images 20000] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import save_random_vit_b32
from workers import decode_run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_photos(folder: Path, count: int) -> list[Any]:
    """``count`` files under ``folder``: the shared photos cycled, each under its own name."""
    from retrieval.sources.items import ImageRef

    photos = sorted((DATA / "coco-train-mini" / "images").glob("*.jpg")) + sorted(
        (DATA / "imagenet-sample").glob("*.JPEG")
    )
    if not photos:
        sys.exit(f"no photos under {DATA}")
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for n in range(count):
        source = photos[n % len(photos)]
        target = folder / f"{n:06d}-{source.name}"
        try:
            os.link(source, target)
        except OSError:  # another file system: copy
            shutil.copyfile(source, target)
        refs.append(ImageRef(path=target, source=str(folder)))
    return refs


def synchronize(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def model_alone(encoder: Any, batch: int, seconds: float, warm: int = 3) -> float:
    """Images/s of the encoder alone on a preloaded batch on its device (after ``warm`` warm-up rounds)."""
    import torch

    pixels = torch.randn(batch, 3, 224, 224, device=encoder.device)
    for _ in range(warm):
        encoder.encode_image_tensors(pixels)
    synchronize(encoder.device)
    rounds, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or rounds < warm:
        encoder.encode_image_tensors(pixels)
        rounds += 1
    synchronize(encoder.device)
    return batch * rounds / (time.perf_counter() - start)


def end_to_end(refs: list[Any], encoder: Any, decode: str, batch: int, workers: int | str) -> tuple[dict, np.ndarray]:
    from retrieval.embed.pipeline import EmbedOptions, embed_images

    options = EmbedOptions(
        batch_size=batch, workers=workers, replicas=False, decode=decode, progress=False, progress_shard_size=0
    )
    start = time.perf_counter()
    result = embed_images(refs, encoder, options)
    seconds = time.perf_counter() - start
    return {
        "images_per_second": round(len(refs) / seconds, 1),
        "seconds": round(seconds, 2),
        "startup_seconds": result.startup_seconds,
        "steady_images_per_second": result.steady_images_per_second,
        "workers": result.workers,
        "decode_device": result.decode_device,
        "decoded_on_device": result.decoded_on_device,
        "skipped": len(result.errors),
    }, result.vectors


def measure_model(name: str, encoder: Any, refs: list[Any], args: argparse.Namespace) -> dict:
    """Model alone, end to end with CPU and GPU decode, and the agreement of the two."""
    report: dict[str, Any] = {"device": str(encoder.device)}
    log(f"{name}: model alone")
    report["model_alone_images_per_second"] = round(model_alone(encoder, args.batch, args.model_seconds, args.warm), 1)
    log(f"{name}: warm-up")
    end_to_end(refs[: args.batch * args.warm], encoder, "cpu", args.batch, args.workers)  # kernels, cuDNN choices
    vectors = {}
    for decode in ("cpu", "gpu"):
        log(f"{name}: end to end, {decode} decode")
        report[f"end_to_end_{decode}_decode"], vectors[decode] = end_to_end(
            refs, encoder, decode, args.batch, args.workers
        )
        share = report[f"end_to_end_{decode}_decode"]["images_per_second"] / report["model_alone_images_per_second"]
        report[f"end_to_end_{decode}_decode_vs_model_alone"] = round(share, 3)
    a, b = vectors["cpu"], vectors["gpu"]
    if a.shape == b.shape and len(a):
        cosines = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        report["min_cosine_gpu_vs_cpu_decode"] = round(float(cosines.min()), 5)
        report["median_cosine_gpu_vs_cpu_decode"] = round(float(np.median(cosines)), 6)
    return report


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--workers", default="auto", help="DataLoader workers for the end-to-end runs ('auto' or a number)"
    )
    parser.add_argument("--model-seconds", type=float, default=5.0, help="how long the model-alone loop runs")
    parser.add_argument(
        "--scaling-images", type=int, default=4096, help="photos of each decode-only worker-scaling run"
    )
    parser.add_argument("--warm", type=int, default=3, help="warm-up batches before each timed model run")
    parser.add_argument(
        "--quick", action="store_true", help="CPU, few photos: check the script (batched decode on the CPU)"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", tempfile.gettempdir())))
    args = parser.parse_args()
    import torch

    import retrieval.embed.pipeline as pipeline
    from retrieval.encoders import load_clip_encoder, load_image_encoder

    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    if args.quick:
        args.images, args.batch, args.model_seconds, args.scaling_images, args.warm = (
            min(args.images, 48),
            16,
            0.0,
            64,
            1,
        )
        args.workers = 2 if args.workers == "auto" else args.workers
        # the batched decode is chosen only on CUDA; --quick runs it on the CPU to check the code path
        pipeline.decode_device = lambda choice, encoder_device, transform: None if choice == "cpu" else "cpu"
    args.workers = args.workers if args.workers == "auto" else int(args.workers)
    work = Path(tempfile.mkdtemp(prefix="gpu-pipeline-"))
    started = time.perf_counter()
    report: dict[str, Any] = {
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cores": len(os.sched_getaffinity(0)),
        "quick": args.quick,
        "batch": args.batch,
    }
    try:
        refs = make_photos(work / "photos", args.images)
        report["images"] = len(refs)
        report["photos_seconds"] = round(time.perf_counter() - started, 1)
        loaders = {
            "vit-b-32": lambda: load_clip_encoder(
                "open_clip:ViT-B-32", checkpoint=str(save_random_vit_b32(work / "vit")), device=device
            ),
            "efficientnet-lite0": lambda: load_image_encoder("efficientnet-lite0", device=device),
        }
        for name, load in loaders.items():
            try:
                encoder = load()
                report[name] = measure_model(name, encoder, refs, args)
                if name == "efficientnet-lite0":
                    report["decode_preprocess_worker_scaling"] = worker_scaling(
                        refs[: args.scaling_images], encoder, args
                    )
            except Exception as exc:  # report what ran; one model failing must not lose the other's numbers
                report[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=4)}
            report["seconds_so_far"] = round(time.perf_counter() - started, 1)
        vit = report.get("vit-b-32", {})
        if "end_to_end_gpu_decode" in vit:
            best = max(
                vit["end_to_end_cpu_decode"]["images_per_second"], vit["end_to_end_gpu_decode"]["images_per_second"]
            )
            report["targets"] = {
                "vit_end_to_end_images_per_second": best,
                "vit_end_to_end_vs_model_alone": round(best / vit["model_alone_images_per_second"], 3),
                "met_half_of_model_alone": best >= 0.5 * vit["model_alone_images_per_second"],
                "met_2500_images_per_second": best >= 2500,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
        report["seconds_total"] = round(time.perf_counter() - started, 1)
        text = json.dumps(report, indent=1)
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_pipeline.json").write_text(text + "\n")


def worker_scaling(refs: list[Any], encoder: Any, args: argparse.Namespace) -> dict:
    """Decode + preprocess alone (CPU path, no model) for 1, 2, 4, ... workers up to the cores."""
    log("decode + preprocess alone: worker scaling")
    cores = len(os.sched_getaffinity(0))
    counts = sorted({n for n in (1, 2, 4, 8, 12, 16, 24, 32) if n <= cores} | {cores})
    found = {n: decode_run(refs, encoder.image_transform(), encoder.draft_size, n, True) for n in counts}
    one = found[1]["steady_images_per_second"]

    def finite(value: float) -> float | None:
        return round(value, 2) if np.isfinite(value) else None  # None: a run too short for a steady state

    return {
        f"workers_{n}": {key: finite(value) for key, value in numbers.items()}
        | {"vs_1": finite(numbers["steady_images_per_second"] / one)}
        for n, numbers in found.items()
    }


if __name__ == "__main__":
    main()
