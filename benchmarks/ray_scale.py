"""The Ray path against the single-machine path on the same photos, and the measured inputs of a model of a large run.

1. Overhead: ``build_index`` over --images photos of ../shared/data (the ImageNet sample and the
   COCO photos, cycled with distinct names past 1,080) with the tests' tiny random CLIP model
   (decoding dominates, as it does on a GPU), once without Ray, once with ``ray="local"`` (a
   cold start: the cluster and its actors start inside the build), and once with ``ray="auto"``
   joining a cluster that is already up (what a long-lived cluster pays). Each is timed end to
   end (gather -> embed -> write); ratios are against the single-machine build of this run.
2. Scheduling: how many work units per second the driver pushes through Ray Data's actor pool
   when a unit does no work (``map_batches`` over one-row blocks, the way builds submit units;
   the marginal rate between runs of u and 5u units, so start-up cancels).
3. Bytes per unit: the size of the unit files a Ray build wrote, per image and per unit.
4. Merging inverted lists: ``merge_in_ram`` and ``merge_on_disk`` (``faiss.contrib.ondisk``) of
   --merge-vectors IVF-PQ vectors split into --parts parts, scaled to seconds per million.

    python benchmarks/ray_scale.py [--images 1200] [--merge-vectors 400000] [--parts 8]

Prints one JSON object; benchmarks/RAY.md holds a run and the model built from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def write_photos(folder: Path, count: int) -> Path:
    """``count`` photos (ImageNet sample, then COCO, cycled), each its own file."""
    files = sorted((DATA / "imagenet-sample").glob("*.JPEG")) + sorted(
        (DATA / "coco-train-mini" / "images").glob("*.jpg")
    )
    if not files:
        raise SystemExit(f"no photos under {DATA}: see ../shared/data/README.md")
    folder.mkdir(parents=True)
    for number in range(count):
        shutil.copyfile(files[number % len(files)], folder / f"{number:06d}.jpg")
    return folder


def timed_build(photos: Path, index: Path, choice, ray) -> tuple[float, int]:
    import retrieval
    from retrieval import EmbedOptions

    start = time.perf_counter()
    retrieval.build_index(
        images=[str(photos)],
        index=str(index),
        encoders=choice,
        embed=EmbedOptions(progress=False),
        options=retrieval.BuildOptions(index_options=retrieval.IndexOptions(index_type="flat"), ray=ray),
    )
    seconds = time.perf_counter() - start
    return seconds, retrieval.open_index(index).manifest["counts"]["image"]


def unit_bytes(unit_size: int, dim: int) -> dict:
    """Bytes of one unit file as a Ray build writes it (vectors, sizes, hashes, its own checksum)."""
    from retrieval.embed.resume import Shard, shard_bytes

    rng = np.random.default_rng(0)
    shard = Shard(
        0,
        unit_size,
        ok=[(n, 640, 480, f"{n:064x}") for n in range(unit_size)],
        vectors=rng.standard_normal((unit_size, dim)).astype(np.float32),
    )
    size = len(shard_bytes(shard, "0" * 64, dim))
    return {
        "dim": dim,
        "images_per_unit": unit_size,
        "bytes_per_unit": size,
        "bytes_per_image": round(size / unit_size, 1),
    }


def overhead(args: argparse.Namespace, tmp: Path) -> dict:
    from tiny_clip import make_tiny_clip

    from retrieval import EncoderChoice
    from retrieval.embed.ray_pipeline import RayOptions, ray_session

    photos = write_photos(tmp / "photos", args.images)
    choice = EncoderChoice(clip="open_clip:tiny", checkpoint=str(make_tiny_clip(tmp / "tiny")), device="cpu")
    single, count = timed_build(photos, tmp / "single", choice, None)
    cold, cold_count = timed_build(
        photos, tmp / "ray-cold", choice, RayOptions(address="local", unit_size=args.unit_size)
    )
    with ray_session(RayOptions(address="local")):
        warm, warm_count = timed_build(
            photos, tmp / "ray-warm", choice, RayOptions(address="auto", unit_size=args.unit_size)
        )
        scheduling = units_per_second(args.sched_units)
    assert count == cold_count == warm_count == args.images, (count, cold_count, warm_count)
    return {
        "images": count,
        "seconds": {
            "single machine": round(single, 2),
            "ray local (cold)": round(cold, 2),
            "ray joined (warm)": round(warm, 2),
        },
        "images_per_second": {
            "single machine": round(count / single, 1),
            "ray local (cold)": round(count / cold, 1),
            "ray joined (warm)": round(count / warm, 1),
        },
        "ratio_to_single": {"ray local (cold)": round(single / cold, 3), "ray joined (warm)": round(single / warm, 3)},
        "unit_size": args.unit_size,
        "units": -(-count // args.unit_size),
        "scheduling": scheduling,
    }


class _Noop:
    """An actor that returns its unit at once: what Ray Data costs per unit, without work."""

    def __call__(self, batch: dict) -> dict:
        return {"start": batch["start"]}


def _map_noop(ray, units: int) -> float:
    data = ray.data.from_items([{"start": n} for n in range(units)], override_num_blocks=units)
    start = time.perf_counter()
    out = data.map_batches(_Noop, batch_size=1, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).take_all()
    assert len(out) == units
    return time.perf_counter() - start


def units_per_second(units: int) -> dict:
    """The marginal rate: (5u - u) units over the difference of two runs' times, so the pool's start-up cancels."""
    import ray

    few, many = _map_noop(ray, units), _map_noop(ray, 5 * units)
    return {
        "units": [units, 5 * units],
        "seconds": [round(few, 2), round(many, 2)],
        "units_per_second": round(4 * units / max(many - few, 1e-9), 1),
    }


def merge_costs(args: argparse.Namespace, tmp: Path) -> dict:
    import faiss

    from retrieval.index.ivf_lists import (
        fill_range,
        merge_in_ram,
        merge_on_disk,
        shard_bounds,
    )
    from retrieval.index.spec import spec_for
    from retrieval.index.vector_index import train_vector_index

    n, d = args.merge_vectors, 512  # ViT-B/32 vectors, as auto would index many of them: IVF-PQ
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1024, d)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    spec = spec_for("ivfpq", n, d)
    start = time.perf_counter()
    trained = train_vector_index(vectors, spec)
    train_seconds = time.perf_counter() - start
    paths, parts = [], []
    start = time.perf_counter()
    for number, (low, high) in enumerate(shard_bounds(n, args.parts)):
        parts.append(fill_range(trained, vectors[low:high], low))
        paths.append(tmp / f"part-{number}.index")
        faiss.write_index(parts[-1], str(paths[-1]))
    fill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    merged = merge_in_ram(trained, parts)
    ram_seconds = time.perf_counter() - start
    assert merged.ntotal == n
    del merged, parts
    start = time.perf_counter()
    on_disk = merge_on_disk(trained, paths, tmp / "lists.ivfdata")
    disk_seconds = time.perf_counter() - start
    assert on_disk.ntotal == n
    per_million = 1e6 / n
    return {
        "vectors": n,
        "dim": d,
        "spec": spec.factory,
        "parts": args.parts,
        "bytes_per_vector_in_lists": round((tmp / "lists.ivfdata").stat().st_size / n, 1),
        "train_seconds": round(train_seconds, 1),
        "fill_seconds_per_million": round(fill_seconds * per_million, 1),
        "merge_in_ram_seconds_per_million": round(ram_seconds * per_million, 2),
        "merge_on_disk_seconds_per_million": round(disk_seconds * per_million, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--unit-size", type=int, default=128, help="loose photos per Ray unit")
    parser.add_argument("--sched-units", type=int, default=200)
    parser.add_argument("--merge-vectors", type=int, default=400_000)
    parser.add_argument("--parts", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        result = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "overhead": overhead(args, tmp)}
        (tmp / "merge").mkdir()
        result["unit_bytes"] = [
            unit_bytes(args.unit_size, 512),
            unit_bytes(10_000, 512),
        ]  # a loose-file unit; an img2dataset shard
        result["merge"] = merge_costs(args, tmp / "merge")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
