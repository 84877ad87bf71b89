"""Which CPU inference settings help: the image towers alone on preloaded tensors, same run.

Compares, per encoder, the default (float32, contiguous, inference_mode) with channels-last
memory format, with bfloat16 autocast and (CLIP towers) with int8 dynamically quantised Linear
layers, and checks the embeddings stay within cosine 0.99.
Each timing is the median of --repeats batches.

Then (``--micro-batches``) the encoders' own CPU settings over one batch cut into slices of each
size, with 1 and with all threads: ms per image, sizes alternating within each repeat.

    python benchmarks/cpu_inference.py [--batch 32] [--repeats 5] [--micro-batches 4,8,16,32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def unit(x) -> np.ndarray:
    x = x.float().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--micro-batches", default="4,8,16,32", help="slice sizes to compare ('' to skip)")
    args = parser.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_check import save_random_vit_b32

    from retrieval.encoders.registry import load_clip_encoder, load_image_encoder

    encoders = {
        "efficientnet-lite0": load_image_encoder("efficientnet-lite0", device="cpu"),
        "ViT-B/32 (random)": load_clip_encoder(
            "open_clip:ViT-B-32", checkpoint=save_random_vit_b32(Path(tempfile.mkdtemp())), device="cpu"
        ),
    }
    pixels = torch.randn(args.batch, 3, 224, 224)
    for name, encoder in encoders.items():
        # the functions below are timed in this iteration only; default arguments bind this encoder's model
        model = encoder._model
        tower = (
            model.encode_image
            if hasattr(model, "encode_image")
            else (lambda x, model=model: model.extract_features(x).mean(dim=(2, 3)))
        )

        def run(x, bf16=False, tower=tower):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return tower(x)

        base_s, base = timed(lambda: run(pixels), args.repeats)
        rows = {"default": (base_s, base)}
        model.to(memory_format=torch.channels_last)
        rows["channels_last"] = timed(lambda: run(pixels.contiguous(memory_format=torch.channels_last)), args.repeats)
        model.to(memory_format=torch.contiguous_format)
        rows["bfloat16 autocast"] = timed(lambda: run(pixels, bf16=True), args.repeats)
        int8 = getattr(encoder, "_int8_tower", lambda: None)()  # CLIP image towers: Linear layers int8 (dynamic)
        if int8 is not None:

            def run_int8(x, int8=int8):
                with torch.inference_mode():
                    return int8(x)

            rows["int8 Linear (dynamic quantisation)"] = timed(lambda: run_int8(pixels), args.repeats)
        for setting, (seconds, out) in rows.items():
            cosine = float(np.sum(unit(base) * unit(out), axis=1).min())
            print(
                json.dumps(
                    {
                        "encoder": name,
                        "setting": setting,
                        "images_per_s": round(args.batch / seconds, 2),
                        "speedup": round(base_s / seconds, 3),
                        "cosine_min": round(cosine, 5),
                    }
                ),
                flush=True,
            )
    sizes = [int(v) for v in args.micro_batches.split(",") if v.strip()]
    if sizes:
        for name, encoder in encoders.items():
            micro_batch_sweep(name, encoder, pixels, sizes, args.repeats)


def micro_batch_sweep(name: str, encoder, pixels, sizes: list[int], repeats: int) -> None:
    """ms per image of the encoder's own CPU path (channels-last, bfloat16 or int8 as it chooses)
    when the batch is cut into slices of each size; one thread, then all."""
    import torch

    from retrieval.encoders import efficientnet

    def sliced(size: int):  # the raw model call, bypassing the encoder's own slicing
        if isinstance(encoder, efficientnet.EfficientNetLiteEncoder):
            x = pixels.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=encoder._cpu_bfloat16):
                return [encoder._model.extract_features(part) for part in x.split(size)]
        tower = encoder._int8_tower() or encoder._model.encode_image
        with torch.inference_mode():
            return [tower(part) for part in pixels.split(size)]

    threads_before = torch.get_num_threads()
    try:
        for threads in sorted({1, threads_before}):
            torch.set_num_threads(threads)
            for size in sizes:
                sliced(size)  # warm-up: kernels for this shape
            times: dict[int, list[float]] = {size: [] for size in sizes}
            for _ in range(repeats):
                for size in sizes:
                    start = time.perf_counter()
                    sliced(size)
                    times[size].append(time.perf_counter() - start)
            print(
                json.dumps(
                    {
                        "encoder": name,
                        "threads": threads,
                        "ms_per_image_by_slice": {
                            size: round(1e3 * statistics.median(times[size]) / len(pixels), 2) for size in sizes
                        },
                    }
                ),
                flush=True,
            )
    finally:
        torch.set_num_threads(threads_before)


if __name__ == "__main__":
    main()
