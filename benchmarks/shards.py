"""webdataset tar shards against the same photos as loose files, in one run; peak memory as the shard count grows.

1. Images per second of the embedding stage (read + decode + preprocess + encode, DataLoader
   workers as ``build-index`` runs them) over N photos from ../shared/data/coco-train-mini
   (cycled, each copy its own file / sample), once as loose JPEG files and once as webdataset
   tar shards (written by webdataset's ShardWriter, --per-shard samples a shard, 10 by default:
   the most shard overhead per sample; img2dataset writes 10,000). The two alternate within each
   repeat; each figure is the median of --repeats. Measured with the files in the page cache
   (warm) and with their data evicted before each run (cold: read from the disk, as a collection
   larger than memory is). Target: shards at least as fast as loose files.
2. Peak RSS of a whole ``build_index`` (gather -> embed -> write, in a fresh process each) over
   the same --rss-images samples split into 1, 10 and 100 shards. Target: flat.

The default encoder is the tests' tiny random CLIP: reading and decoding dominate, which is what
differs between the two layouts (a real encoder adds the same model time to both).

    python benchmarks/shards.py [--images 320] [--repeats 3] [--rss-images 400] [--encoder tiny|SPEC]
                                [--per-shard 10] [--cache warm|cold|both]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco-train-mini"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def photos(n: int) -> list[Path]:
    files = sorted((COCO / "images").glob("*.jpg"))
    return [files[i % len(files)] for i in range(n)]


def write_loose(folder: Path, files: list[Path]) -> Path:
    folder.mkdir(parents=True)
    for i, file in enumerate(files):
        shutil.copyfile(file, folder / f"{i:09d}.jpg")
    return folder


def write_shards(folder: Path, files: list[Path], per_shard: int) -> Path:
    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, file in enumerate(files):
            key = f"{i:09d}"
            sink.write(
                {
                    "__key__": key,
                    "jpg": file.read_bytes(),
                    "txt": f"photo {file.name}",
                    "json": {"key": key, "url": f"http://127.0.0.1/{file.name}"},
                }
            )
    return folder


def encoder_choice(spec: str, tmp: Path):
    from retrieval import EncoderChoice

    if spec == "tiny":
        from tiny_clip import make_tiny_clip

        return EncoderChoice(clip="open_clip:tiny", checkpoint=str(make_tiny_clip(tmp / "tiny")), device="cpu")
    if spec.startswith("open_clip:"):
        return EncoderChoice(clip=spec, device="cpu")
    return EncoderChoice(image=spec, text="minilm", device="cpu")


def evict(folder: Path) -> None:
    """Drop the data of every file under ``folder`` from the page cache (``posix_fadvise(DONTNEED)``;
    the files were synced after writing, so their pages are clean and can go): the next reads come
    from the disk, as they do for a collection larger than memory. Directory entries and inodes
    stay cached (dropping those needs /proc/sys/vm/drop_caches)."""
    for file in folder.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def throughput(args: argparse.Namespace, tmp: Path) -> dict:
    from retrieval import CaptionOptions
    from retrieval.api.build import gather_items
    from retrieval.embed.pipeline import EmbedOptions, embed_images
    from retrieval.encoders.registry import load_encoders

    files = photos(args.images)
    sources = {
        "loose files": write_loose(tmp / "loose", files),
        "tar shards": write_shards(tmp / "shards", files, args.per_shard),
    }
    os.sync()  # clean pages: evict() can drop them
    encoder, _ = load_encoders(encoder_choice(args.encoder, tmp))
    options = EmbedOptions(progress=False)
    caches = ("warm", "cold") if args.cache == "both" else (args.cache,)
    times: dict[tuple[str, str], list[float]] = {}
    gathers: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeats):
        for cache in caches:
            order = list(sources.items())[:: 1 if repeat % 2 == 0 else -1]  # who goes first alternates too
            for name, source in order:  # the layouts alternate within each repeat
                if cache == "cold":
                    evict(source)
                start = time.perf_counter()
                items = gather_items([str(source)], [], CaptionOptions()).images  # discovery / shard scan counts too
                gathers.setdefault((cache, name), []).append(time.perf_counter() - start)
                done = embed_images(items, encoder, options)
                times.setdefault((cache, name), []).append(time.perf_counter() - start)
                assert len(done.rows) == args.images and not done.errors, name
    out: dict = {
        "images": args.images,
        "per_shard": args.per_shard,
        "repeats": args.repeats,
        "encoder": args.encoder,
        "workers": done.workers,
    }
    for cache in caches:
        rates = {name: round(args.images / statistics.median(times[cache, name]), 1) for name in sources}
        out[f"page_cache_{cache}"] = {
            "images_per_second": rates,
            "ratio": round(rates["tar shards"] / rates["loose files"], 3),
            "ratio_by_repeat": [
                round(a / b, 3) for a, b in zip(times[cache, "loose files"], times[cache, "tar shards"], strict=True)
            ],
            "gather_ms": {name: round(1000 * statistics.median(gathers[cache, name]), 1) for name in sources},
        }
    return out


def rss_child(shards: str, index: str, encoder: str, tmp: str) -> None:
    """One build in this (fresh) process; prints its peak RSS in MiB."""
    import retrieval
    from retrieval import EmbedOptions

    choice = encoder_choice(encoder, Path(tmp))
    retrieval.build_index(
        images=[shards],
        index=index,
        encoders=choice,
        embed=EmbedOptions(workers=0, progress=False),
        anchors=None if choice.is_contrastive else "builtin:imagenet",
    )
    print(json.dumps({"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def rss(args: argparse.Namespace, tmp: Path) -> dict:
    files = photos(args.rss_images)
    out = {}
    for count in (1, 10, 100):
        shards = write_shards(tmp / f"rss-{count}", files, -(-len(files) // count))
        assert len(list(shards.glob("*.tar"))) == count
        done = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(shards), str(tmp / f"index-{count}"), args.encoder, str(tmp)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[count] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return {"samples": args.rss_images, "peak_rss_mib_by_shard_count": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-images", type=int, default=400)
    parser.add_argument("--encoder", default="tiny")
    parser.add_argument("--per-shard", type=int, default=10, help="samples a shard (img2dataset's default is 10,000)")
    parser.add_argument(
        "--cache",
        choices=("warm", "cold", "both"),
        default="both",
        help="warm: the files in the page cache; cold: evicted before each run",
    )
    parser.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        result = {"date": time.strftime("%Y-%m-%d"), "throughput": throughput(args, tmp), "memory": rss(args, tmp)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
