"""GPU check of the whole CLIP path: build with --device auto (CUDA, half precision), compare with CPU.

Uses a randomly initialised ViT-B/32 open_clip model saved to a local folder
(speed and agreement do not depend on the weights being trained) and the COCO
photos + captions. Prints JSON: images/s on each device, the worst cosine
between CUDA and CPU vectors, whether the top hits agree, and the model alone
on preloaded tensors (eager, and torch.compile'd as with --compile).

    python benchmarks/gpu_check.py COCO_DIR [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def save_random_vit_b32(folder: Path) -> Path:
    """A random ViT-B/32 in open_clip's local-dir layout (config + safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = open_clip.get_model_config("ViT-B-32")
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    preprocess = {
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def model_alone(encoder, batch: int = 256, rounds: int = 20) -> float:
    """Images/s of the image tower alone on preloaded tensors on the encoder's device."""
    import torch

    pixels = torch.randn(batch, 3, 224, 224, device=encoder.device)
    for _ in range(3):
        encoder.encode_image_tensors(pixels)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        encoder.encode_image_tensors(pixels)
    torch.cuda.synchronize()
    return batch * rounds / (time.perf_counter() - start)


def end_to_end(encoder, coco: Path, work: Path, copies: int) -> dict:
    """Images/s of the whole embedding stage over copies of the COCO photos, and of decoding alone."""
    import shutil

    from torch.utils.data import DataLoader

    from retrieval.embed.pipeline import (
        EmbedOptions,
        _collate,
        _ImageDataset,
        embed_images,
    )
    from retrieval.embed.workers import resolve_workers
    from retrieval.sources.discovery import find_images

    folder = work / "photos"
    folder.mkdir()
    for n in range(copies):
        for photo in sorted((coco / "images").glob("*.jpg")):
            shutil.copy(photo, folder / f"{n:03d}-{photo.name}")
    refs = find_images([folder])
    options = EmbedOptions(batch_size=256, workers="auto", progress=False)
    embed_images(refs[:512], encoder, options)  # warm-up: workers, CUDA kernels
    start = time.perf_counter()
    embed_images(refs, encoder, options)
    pipeline = len(refs) / (time.perf_counter() - start)
    workers = resolve_workers("auto", len(refs))
    loader = DataLoader(
        _ImageDataset(refs, encoder.image_transform(), encoder.draft_size),
        batch_size=256,
        num_workers=workers,
        collate_fn=_collate,
    )
    start = time.perf_counter()
    for _ in loader:
        pass
    decode = len(refs) / (time.perf_counter() - start)
    return {
        "images": len(refs),
        "workers": workers,
        "pipeline_images_per_second": round(pipeline, 1),
        "decode_preprocess_only_images_per_second": round(decode, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("coco", type=Path)
    parser.add_argument("--copies", type=int, default=20, help="copies of the 80 COCO photos for the throughput run")
    args = parser.parse_args()
    import torch

    import retrieval
    from retrieval import EmbedOptions, EncoderChoice

    work = Path(tempfile.mkdtemp())
    checkpoint = save_random_vit_b32(work / "vit-b-32")
    report: dict = {
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    indexes = {}
    for device in ("auto", "cpu"):
        choice = EncoderChoice(clip="open_clip:ViT-B-32", checkpoint=str(checkpoint), device=device)
        start = time.perf_counter()
        indexes[device] = retrieval.build_index(
            captions=[args.coco / "captions.jsonl"],
            index=work / f"index-{device}",
            encoders=choice,
            embed=EmbedOptions(batch_size=64, workers=4, progress=False),
        )
        build = indexes[device].manifest["build"]
        report[f"build_{device}"] = {
            "device": build["device"],
            "images_per_second": build["images_per_second"],
            "seconds_total": round(time.perf_counter() - start, 2),
        }
    gpu, cpu = indexes["auto"], indexes["cpu"]
    for kind, key in (("image", "clip/image"), ("caption", "clip/caption")):
        a = gpu._store.read_vectors(gpu.manifest["files"]["vectors"][key])
        b = cpu._store.read_vectors(cpu.manifest["files"]["vectors"][key])
        cosine = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        report[f"min_cosine_cuda_vs_cpu_{kind}"] = round(float(cosine.min()), 5)
    query = "a family sitting at a table with a birthday cake"
    report["same_top5_text_to_image"] = [h.id for h in gpu.text_to_image(query, 5)] == [
        h.id for h in cpu.text_to_image(query, 5)
    ]
    reopened = retrieval.open_index(gpu.path, device="cpu")  # built on CUDA, queried on CPU: same fingerprint
    report["gpu_index_opens_on_cpu"] = (
        len(reopened.image_to_caption(next((args.coco / "images").glob("*.jpg")), 3)) == 3
    )
    if torch.cuda.is_available():
        report["model_alone_images_per_second"] = round(model_alone(gpu.image_encoder), 1)
        with gpu.image_encoder.compiled():  # --compile: torch.compile'd tower (compiled in the warm-up rounds)
            report["model_alone_compiled_images_per_second"] = round(model_alone(gpu.image_encoder), 1)
    report["throughput"] = end_to_end(gpu.image_encoder, args.coco, work, copies=args.copies)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
