"""Other CPU runtimes and settings against what the encoders do now, same run, same inputs.

    pip install onnxruntime onnx onnxscript      # only for this benchmark (rows skipped without it)
    python benchmarks/cpu_runtimes.py [--repeats 5] [--captions 2000]

Image towers (EfficientNet-Lite0, ViT-B/32 with random weights), one batch of 32 preloaded
tensors, all threads: the encoder's own ``encode_image_tensors`` (bfloat16 in slices of 8 /
int8 Linear layers) against ONNX Runtime float32 on the exported model, and the plain model
under ``torch.no_grad`` against ``torch.inference_mode``.

Text (MiniLM, COCO captions): our ``encode_texts`` (bfloat16 autocast) against float32,
torch int8 dynamic quantisation of the Linear layers, ONNX Runtime float32 and ONNX Runtime
int8 (dynamic quantisation); each through the same length-sorted batches of 64.

Every row reports throughput, the ratio to the current path and the smallest cosine against
float32 torch. Paths alternate within each repeat; medians of --repeats.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import median_times  # same folder

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def report(
    kind: str, count: int, timed: dict[str, tuple[float, np.ndarray]], current: str, reference: np.ndarray
) -> None:
    base_s = timed[current][0]
    for name, (seconds, out) in timed.items():
        cosine = float(np.sum(unit(out) * unit(reference), axis=1).min())
        print(
            json.dumps(
                {
                    "model": kind,
                    "path": name,
                    "per_s": round(count / seconds, 1),
                    "vs_current": round(base_s / seconds, 3),
                    "cosine_min_vs_fp32": round(cosine, 5),
                }
            ),
            flush=True,
        )


def onnx_session(module, example: tuple, names: list[str], dynamic: dict, folder: Path, int8: bool = False):
    """An ONNX Runtime session for ``module`` exported with the legacy TorchScript exporter, or None."""
    try:
        import onnxruntime as ort
        import torch
    except ImportError:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{type(module).__name__}.onnx"
    with torch.enable_grad():  # no fused attention fast path (it has no ONNX export)
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=names,
            output_names=["out"],
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = folder / f"{type(module).__name__}.int8.onnx"
        quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
        path = quantized
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def pooled_features(model):
    """EfficientNet's pooled features as one module (what ONNX exports)."""
    import torch

    class Features(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.extract_features(x).mean(dim=(2, 3))

    return Features(model)


def image_rows(repeats: int, folder: Path) -> None:
    import torch
    from gpu_check import save_random_vit_b32

    from retrieval.encoders.registry import load_clip_encoder, load_image_encoder

    pixels = torch.randn(32, 3, 224, 224)
    encoders = {
        "efficientnet-lite0": load_image_encoder("efficientnet-lite0", device="cpu"),
        "ViT-B/32 (random)": load_clip_encoder(
            "open_clip:ViT-B-32", checkpoint=save_random_vit_b32(folder / "vit"), device="cpu"
        ),
    }
    for name, encoder in encoders.items():
        model = copy.deepcopy(encoder._model).to(memory_format=torch.contiguous_format)
        plain = model.visual if hasattr(model, "visual") else pooled_features(model)
        plain.eval()

        def run(context, module=plain):
            with context():
                return module(pixels).float().numpy()

        # timed below, in this iteration: each path is bound to this encoder's objects
        paths = {
            "current (encode_image_tensors)": partial(encoder.encode_image_tensors, pixels),
            "fp32 torch.no_grad": partial(run, torch.no_grad),
            "fp32 torch.inference_mode": partial(run, torch.inference_mode),
        }
        session = onnx_session(plain, (pixels[:2],), ["pixels"], {"pixels": {0: "batch"}, "out": {0: "batch"}}, folder)
        if session is not None:
            feed = {"pixels": pixels.numpy()}
            paths["onnxruntime fp32"] = lambda session=session, feed=feed: session.run(None, feed)[0]
        timed = median_times(paths, repeats, warmup=True)
        report(name, len(pixels), timed, "current (encode_image_tensors)", timed["fp32 torch.inference_mode"][1])


def sentence_transformer_of(encoder):
    """A SentenceTransformer over the folder ``encoder`` reads: the encoder itself runs BERT directly (tokenizers
    + safetensors, no sentence-transformers), so the fp32 torch and ONNX baselines load the library's model."""
    from sentence_transformers import SentenceTransformer

    folder = encoder._model.folder.model_dir
    while not (folder / "modules.json").is_file():
        folder = folder.parent
    return SentenceTransformer(str(folder), device="cpu")


def text_rows(repeats: int, count: int, folder: Path) -> None:
    import torch

    from retrieval.encoders.registry import load_text_encoder
    from retrieval.sources.captions import read_caption_file

    texts = [r.text for r in read_caption_file(DATA / "coco-train-mini" / "captions.jsonl").records]
    texts = (texts * (count // len(texts) + 1))[:count]
    encoder = load_text_encoder("minilm", device="cpu")
    st = sentence_transformer_of(encoder)  # the same weights in sentence-transformers, the baselines' model
    tokenizer = st.tokenizer
    order = np.argsort([-len(t) for t in texts], kind="stable")  # as SentenceTransformer.encode batches
    batches = [[texts[i] for i in order[s : s + 64]] for s in range(0, len(texts), 64)]

    def pooled(run_batch) -> np.ndarray:
        rows = []
        for batch in batches:
            tokens = tokenizer(batch, padding=True, truncation=True, max_length=256, return_tensors="np")
            hidden = run_batch(tokens)
            mask = tokens["attention_mask"][..., None].astype(np.float32)
            rows.append((hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))
        out = np.empty((len(texts), rows[0].shape[1]), np.float32)
        out[order] = np.concatenate(rows)
        return unit(out)

    bert = st[0].auto_model.eval()
    int8_bert = torch.ao.quantization.quantize_dynamic(copy.deepcopy(bert), {torch.nn.Linear}, dtype=torch.qint8)

    def torch_batch(module):
        def run(tokens):
            with torch.inference_mode():
                inputs = {k: torch.from_numpy(v) for k, v in tokens.items()}
                return module(**inputs).last_hidden_state.float().numpy()

        return run

    paths = {
        "current (encode_texts, bf16 autocast)": lambda: encoder.encode_texts(texts),
        "fp32 torch": lambda: pooled(torch_batch(bert)),
        "int8 torch quantize_dynamic": lambda: pooled(torch_batch(int8_bert)),
    }
    example = tokenizer(batches[0][:2], padding=True, return_tensors="pt")
    names = list(example.keys())
    dynamic = {name: {0: "batch", 1: "tokens"} for name in names} | {"out": {0: "batch", 1: "tokens"}}

    class Hidden(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(names, args, strict=True))).last_hidden_state

    for label, int8 in (("onnxruntime fp32", False), ("onnxruntime int8 (dynamic)", True)):
        session = onnx_session(
            Hidden(bert),
            tuple(example[n] for n in names),
            names,
            dynamic,
            folder / ("text-int8" if int8 else "text-fp32"),
            int8,
        )
        if session is not None:
            paths[label] = (
                lambda s: lambda: pooled(lambda tokens: s.run(None, {n: tokens[n].astype(np.int64) for n in names})[0])
            )(session)
    timed = median_times(paths, repeats, warmup=True)
    report("minilm", len(texts), timed, "current (encode_texts, bf16 autocast)", timed["fp32 torch"][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--captions", type=int, default=2000)
    args = parser.parse_args()
    if importlib.util.find_spec("onnxruntime") is None:
        print(
            "onnxruntime is not installed: its rows are skipped (pip install onnxruntime onnx onnxscript)",
            file=sys.stderr,
        )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        image_rows(args.repeats, folder)
        text_rows(args.repeats, args.captions, folder)


if __name__ == "__main__":
    main()
