"""Wall time of one query from the shell, against the time Python takes just to ``import torch``.

A query from the command line is a fresh process: its cost is mostly imports and model loading,
not the search. This builds two small indexes from real COCO photos (../shared/data) in a
temporary folder, through the CLI as a user would:

* ASIF: EfficientNet-Lite0 + MiniLM bridged by the built-in ImageNet anchors (examples/demo.sh);
* CLIP: the tiny random open_clip model of tests/tiny_clip.py (no CLIP weights offline here);

then times ``retrieval text-to-image`` and ``retrieval image-to-caption`` on each (subprocess wall
time, median of --repeats) and ``python -c "import torch"`` in the same rounds (the commands
alternate within each round, so a machine that slows down slows all alike). The target: every
query within 2x the torch import. ``--importtime`` also lists, per query, the heavy packages it
imported and their cumulative import time (``python -X importtime``).

    python benchmarks/query_startup.py [--images 32] [--repeats 5] [--importtime]

Measured 2026-11-29 on the shared 2-core CPU (load average about 1.5), 32 photos, median of 5,
before (f685fda) and after the direct MiniLM path (:mod:`retrieval.encoders.bert`):

    query                  before          after
    import torch           1.41 s          1.43 s
    asif text-to-image     6.06 s  4.29x   2.02 s  1.41x
    asif image-to-caption  5.99 s  4.24x   1.92 s  1.34x
    clip text-to-image     4.65 s  3.29x   4.75 s  3.32x
    clip image-to-caption  4.50 s  3.19x   4.72 s  3.30x

Before, ASIF queries imported sentence_transformers (with transformers, sklearn, timm and
torchvision). CLIP queries imported open_clip, which itself imports torchvision (and with it
torch._dynamo) and transformers: about 2 s on top of torch. Since the CLIP query snapshots
(:mod:`retrieval.encoders.clip_snapshot`: the towers traced to TorchScript, loaded with torch
alone), measured 2026-11-30 (load average 0.8 to 1.0), median of 5 after a first run:

    query                  median          first run
    import torch           1.31 s  1.00x   1.25 s
    asif text-to-image     1.84 s  1.40x   1.84 s
    asif image-to-caption  1.90 s  1.45x   1.87 s
    clip text-to-image     1.99 s  1.52x   4.60 s  (the model's first query writes its snapshot)
    clip image-to-caption  2.01 s  1.53x   1.95 s
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco-train-mini"
TARGET = 2.0  # a query may take at most this many times the wall time of `import torch`
HEAVY = (
    "torch",
    "faiss",
    "sentence_transformers",
    "transformers",
    "open_clip",
    "timm",
    "torchvision",
    "sklearn",
    "pyarrow.dataset",
    "efficientnet_lite_pytorch",
    "tokenizers",
    "safetensors",
)
CLI = [sys.executable, "-c", "from retrieval.cli import main; main()"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if SNAPSHOTS:  # CLIP query snapshots go to the run's temporary folder, not the user's cache
        env["RETRIEVAL_CACHE_DIR"] = SNAPSHOTS[0]
    return env


SNAPSHOTS: list[str] = []  # set once by main()


def _run(args: list[str], importtime: bool = False) -> subprocess.CompletedProcess:
    command = [args[0], "-X", "importtime", *args[1:]] if importtime else args
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"command failed ({done.returncode}): {' '.join(args)}\n{done.stderr[-2000:]}")
    return done


def make_collection(folder: Path, n_images: int) -> tuple[Path, Path]:
    """Copy the first ``n_images`` COCO photos and write their (image, caption) pairs file."""
    rows = [json.loads(line) for line in (COCO / "captions.jsonl").read_text().splitlines() if line.strip()]
    keep: list[str] = []
    for row in rows:
        if row["image"] not in keep and len(keep) < n_images:
            keep.append(row["image"])
    for image in keep:
        (folder / image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(COCO / image, folder / image)
    pairs = folder / "pairs.jsonl"
    with open(pairs, "w", encoding="utf-8") as handle:
        for row in rows:
            if row["image"] in keep:
                handle.write(json.dumps({"image": row["image"], "caption": row["caption"]}) + "\n")
    return pairs, folder / keep[0]


def build_indexes(work: Path, n_images: int) -> tuple[dict[str, Path], Path]:
    """The ASIF and tiny-CLIP indexes (built through the CLI) and one query photo."""
    pairs, photo = make_collection(work / "photos", n_images)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_clip import make_tiny_clip

    tiny = make_tiny_clip(work / "tiny-clip")
    indexes = {"asif": work / "asif-index", "clip": work / "clip-index"}
    common = ["build-index", "--captions", str(pairs), "--quiet"]
    _run(
        CLI
        + common
        + [
            "--index",
            str(indexes["asif"]),
            "--image-encoder",
            "efficientnet-lite0",
            "--text-encoder",
            "minilm",
            "--anchors",
            "builtin:imagenet",
        ]
    )
    _run(CLI + common + ["--index", str(indexes["clip"]), "--encoder", "open_clip:tiny", "--checkpoint", str(tiny)])
    return indexes, photo


def query_commands(indexes: dict[str, Path], photo: Path) -> dict[str, list[str]]:
    commands = {"import torch": [sys.executable, "-c", "import torch"]}
    for mode, index in indexes.items():
        commands[f"{mode} text-to-image"] = CLI + [
            "text-to-image",
            "a man riding a horse",
            "--index",
            str(index),
            "-k",
            "5",
        ]
        commands[f"{mode} image-to-caption"] = CLI + ["image-to-caption", str(photo), "--index", str(index), "-k", "5"]
    return commands


def first_walls(commands: dict[str, list[str]]) -> dict[str, float]:
    """Wall seconds of each command's first run (a CLIP query's first run writes its snapshot)."""
    walls = {}
    for name, command in commands.items():
        start = time.perf_counter()
        _run(command)
        walls[name] = time.perf_counter() - start
    return walls


def median_walls(commands: dict[str, list[str]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each command; the commands alternate within each round."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            start = time.perf_counter()
            _run(command)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def heavy_imports(command: list[str]) -> dict[str, float]:
    """Cumulative import seconds of the HEAVY packages a command imports (top-level imports only)."""
    found: dict[str, float] = {}
    for line in _run(command, importtime=True).stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        name = name.strip()
        if name in HEAVY and name not in found:
            found[name] = int(cumulative) / 1e6
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="COCO photos to index (at most 80)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--importtime", action="store_true", help="also list each query's heavy imports")
    args = parser.parse_args()
    if not (COCO / "captions.jsonl").is_file():
        raise SystemExit(f"real photos not found at {COCO}")
    with tempfile.TemporaryDirectory(prefix="query-startup-") as tmp:
        SNAPSHOTS.append(str(Path(tmp) / "cache"))
        indexes, photo = build_indexes(Path(tmp), args.images)
        commands = query_commands(indexes, photo)
        first = first_walls(commands)
        walls = median_walls(commands, args.repeats)
        baseline = walls["import torch"]
        print(
            f"{args.images} photos, median of {args.repeats} after a first run (shown apart: a CLIP query's "
            f"first run writes its snapshot); target: a query <= {TARGET:g}x `import torch`"
        )
        failed = []
        for name, wall in walls.items():
            ratio = wall / baseline
            verdict = "" if name == "import torch" else ("  ok" if ratio <= TARGET else "  OVER")
            failed += [name] if verdict == "  OVER" else []
            print(f"  {name:<24} {wall:6.2f} s  {ratio:5.2f}x{verdict}   (first run {first[name]:.2f} s)")
        if args.importtime:
            for name, command in commands.items():
                heavy = heavy_imports(command)
                print(f"  {name}: " + (", ".join(f"{k} {v:.2f} s" for k, v in heavy.items()) or "none"))
    if failed:
        raise SystemExit(f"over {TARGET:g}x: {', '.join(failed)}")


if __name__ == "__main__":
    main()
