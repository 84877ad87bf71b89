"""Do DataLoader workers scale? Images/s of decode + preprocess, and of the whole embedding stage,
for 1, 2, ... workers, the steady state printed apart from start-up (issue 17 section 1).

Photos: the COCO + ImageNet photos of ../shared/data, cycled to --images. Decode + preprocess is
the embedding stage's own dataset and DataLoader (EfficientNet-Lite0's transform, batches of 32,
the stage's worker_init_fn) with nothing encoding; start-up is the time to the first batch
(process spawn, first decodes), the steady state is every batch after each worker's first
(images / seconds). ``--no-single-threaded`` runs the same with workers that keep the thread
pools they inherit (the code before issue 17), for comparison. ``cpu_ms_per_image`` (CPU time of this process
and its workers per image) hardly depends on other load on the machine: workers that scale
keep it flat as they are added; workers that fight over cores (issue 17) make it grow. The whole stage is
``embed_images`` with EfficientNet-Lite0 (and tiny CLIP with --tiny-clip), reporting its own
``startup_seconds`` and ``steady_images_per_second``. Worker counts alternate within each
repeat; each number is the median of --repeats.

    python benchmarks/workers.py [--images 640] [--repeats 3] [--max-workers N] [--tiny-clip] [--in-process] \
        [--no-single-threaded]

Target (issue 17): on the 2-core machine, 2 workers >= 1.7x one, steady state.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BATCH = 32


def photo_refs(count: int) -> list[Any]:
    """``count`` ImageRefs over the COCO + ImageNet photos, cycled (the same files repeat)."""
    from retrieval.sources.items import ImageRef

    photos = sorted((DATA / "coco-train-mini" / "images").glob("*.jpg")) + sorted(
        (DATA / "imagenet-sample").glob("*.JPEG")
    )
    if not photos:
        sys.exit(f"no photos under {DATA}")
    return [ImageRef(path=photos[i % len(photos)], source="bench") for i in range(count)]


def _no_init(worker_id: int) -> None:
    """A worker_init_fn that leaves the worker's thread pools as inherited."""


def decode_run(refs: list[Any], transform: Any, draft: Any, workers: int, single_threaded: bool) -> dict[str, float]:
    """One pass of decode + preprocess: start-up to the first batch, steady images/s after each worker's first."""
    from torch.utils.data import DataLoader

    from retrieval.embed.pipeline import _collate, _ImageDataset
    from retrieval.embed.workers import WorkerInit

    batches = [list(range(i, min(i + BATCH, len(refs)))) for i in range(0, len(refs), BATCH)]
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    loader = DataLoader(
        _ImageDataset(refs, transform, draft),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=4 if workers else None,
        worker_init_fn=(WorkerInit() if single_threaded else _no_init) if workers else None,
    )
    warm = max(workers, 1)  # every worker's first batch counts as start-up
    arrivals = []
    for batch in loader:
        arrivals.append((time.perf_counter(), len(batch["positions"])))
    first, warm_end = arrivals[0][0], arrivals[min(warm, len(arrivals)) - 1][0]
    steady_images = sum(n for _, n in arrivals[warm:])
    steady_seconds = arrivals[-1][0] - warm_end
    del loader  # the iterator joined its workers when it ran out: their CPU time is counted now
    return {
        "cpu_ms_per_image": 1000 * (_cpu_seconds() - cpu_before) / len(refs),
        "startup_seconds": first - start,
        "steady_images_per_second": steady_images / steady_seconds if steady_seconds > 0 else float("nan"),
        "overall_images_per_second": len(refs) / (arrivals[-1][0] - start),
    }


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its children that ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def embed_run(refs: list[Any], encoder: Any, workers: int, replicas: bool) -> dict[str, float]:
    from retrieval.embed.pipeline import EmbedOptions, embed_images

    start = time.perf_counter()
    result = embed_images(
        refs, encoder, EmbedOptions(workers=workers, replicas=replicas and workers >= 1, progress=False)
    )
    seconds = time.perf_counter() - start
    return {
        "startup_seconds": result.startup_seconds,
        "steady_images_per_second": result.steady_images_per_second,
        "overall_images_per_second": len(refs) / seconds,
    }


def medians(runs: list[dict[str, float]]) -> dict[str, float | None]:
    """Median of each number over the runs (None where a run was too short for a steady state)."""
    found = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return {key: round(value, 3) if math.isfinite(value) else None for key, value in found.items()}


def measure(fns: dict[str, Any], repeats: int) -> dict[str, dict[str, float]]:
    """Median of each function's numbers; the functions alternate within each repeat."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(fn())
    return {name: medians(found) for name, found in runs.items()}


def scaling(results: dict[str, dict[str, float]], prefix: str, counts: list[int]) -> dict[str, float]:
    one = results[f"{prefix}{counts[0]}"]["steady_images_per_second"]
    return {
        f"{n}_vs_{counts[0]}": round(results[f"{prefix}{n}"]["steady_images_per_second"] / one, 3)
        if one and results[f"{prefix}{n}"]["steady_images_per_second"]
        else None
        for n in counts[1:]
    }


def tiny_clip_encoder(folder: Path) -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_clip import make_tiny_clip

    from retrieval.encoders import load_clip_encoder

    return load_clip_encoder("open_clip:tiny", checkpoint=str(make_tiny_clip(folder / "tiny")), device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--no-single-threaded", action="store_true", help="also run workers that keep inherited thread pools"
    )
    parser.add_argument("--tiny-clip", action="store_true", help="also embed with tiny CLIP")
    parser.add_argument("--no-embed", action="store_true", help="decode + preprocess only")
    parser.add_argument("--in-process", action="store_true", help="also embed with no workers (slow under load)")
    args = parser.parse_args()
    from retrieval.encoders import load_image_encoder

    refs = photo_refs(args.images)
    counts = list(range(1, args.max_workers + 1))
    effnet = load_image_encoder("efficientnet-lite0", device="cpu")
    transform, draft = effnet.image_transform(), effnet.draft_size
    report: dict[str, Any] = {"images": len(refs), "cores": len(os.sched_getaffinity(0)), "repeats": args.repeats}
    fns = {f"workers_{n}": (lambda n=n: decode_run(refs, transform, draft, n, True)) for n in counts}
    if args.no_single_threaded:
        fns.update({f"inherited_{n}": (lambda n=n: decode_run(refs, transform, draft, n, False)) for n in counts})
    decode_run(refs[: BATCH * 2], transform, draft, 1, True)  # warm the page cache and imports
    decoded = measure(fns, args.repeats)
    report["decode_preprocess"] = decoded
    report["decode_preprocess_scaling"] = scaling(decoded, "workers_", counts)
    if args.no_single_threaded:
        report["decode_preprocess_scaling_inherited_pools"] = scaling(decoded, "inherited_", counts)
    if not args.no_embed:
        encoders = {"efficientnet-lite0": effnet}
        if args.tiny_clip:
            encoders["tiny-clip"] = tiny_clip_encoder(Path(tempfile.mkdtemp()))
        for name, encoder in encoders.items():
            fns = {f"workers_{n}": (lambda n=n, e=encoder: embed_run(refs, e, n, True)) for n in counts}
            if args.in_process:
                fns["workers_0"] = lambda e=encoder: embed_run(
                    refs, e, 0, False
                )  # no workers: this process decodes and encodes
            found = measure(fns, args.repeats)
            report[f"embed_{name}"] = found
            report[f"embed_{name}_scaling"] = scaling(found, "workers_", counts)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
