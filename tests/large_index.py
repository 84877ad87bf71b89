"""A large CLIP index (>= 100,000 images) made in seconds, without encoding a photo: for load tests and benchmarks.

Usage::

    from large_index import make_large_index          # tests/ is on sys.path under pytest
    path = make_large_index(tmp_path / "big", tiny_clip_dir)          # 100,000 images, 10,000 captions

The vectors are synthetic: unit vectors in ``CLUSTERS`` clusters around random unit centres, in the
tiny CLIP model's space (``tests/tiny_clip.py``, dim 32), and the index records that model (spec,
fingerprint, checkpoint) so the server and ``open_index`` load it and text and image queries work.
Every image row points at its own file: ``CLUSTERS`` small generated JPEGs (one colour per cluster),
hard-linked under one name per row, so ids (derived from paths) are unique and every thumbnail can be
made. Captions (``caption N of cluster C``) are paired with the first images, their vectors near
their image's. The index is written through the project's own write stage
(:func:`retrieval.api.write.write_index`), with ``index_type`` ``ivf`` by default: ``auto`` picks
IVF+SQ for 100k vectors and tunes it, which takes longer; IVF-Flat trains in a few seconds here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

CLUSTERS = 64
NOISE = 0.35  # spread of a cluster's members around its centre (before normalising)
PICTURE_SIZE = (48, 40)  # width, height of the generated JPEGs


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered_vectors(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(``n`` x ``dim`` unit vectors, the cluster of each row): ``CLUSTERS`` clusters, rows assigned round-robin."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.standard_normal((CLUSTERS, dim)))
    clusters = np.arange(n) % CLUSTERS
    return unit_rows(centres[clusters] + NOISE * rng.standard_normal((n, dim)) / np.sqrt(dim)), clusters


def write_pictures(folder: Path) -> list[tuple[Path, str]]:
    """One small JPEG per cluster, a distinct colour each; returns (path, sha256) per cluster."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for cluster in range(CLUSTERS):
        colour = ((cluster * 37) % 256, (cluster * 91) % 256, (cluster * 53 + 80) % 256)
        path = folder / f"cluster-{cluster:02d}.jpg"
        Image.new("RGB", PICTURE_SIZE, colour).save(path, format="JPEG", quality=90)
        out.append((path, hashlib.sha256(path.read_bytes()).hexdigest()))
    return out


def image_rows(folder: Path, clusters: np.ndarray) -> list:
    """One :class:`ImageRow` per vector, each a hard link to its cluster's picture (its own path, so its own id)."""
    from retrieval.embed.pipeline import ImageRow
    from retrieval.sources.items import ImageRef

    pictures = write_pictures(folder / "pictures")
    links = folder / "images"
    links.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, cluster in enumerate(clusters.tolist()):
        picture, sha = pictures[cluster]
        path = links / f"{number:06d}.jpg"
        os.link(picture, path)
        rows.append(ImageRow(ImageRef(path=path, source=str(links)), PICTURE_SIZE[0], PICTURE_SIZE[1], sha))
    return rows


def caption_items(images: list, image_vectors: np.ndarray, clusters: np.ndarray, count: int, seed: int = 1):
    """``count`` captions paired with the first images, each vector close to its image's."""
    from retrieval.sources.items import CaptionRecord

    count = min(count, len(images))
    rng = np.random.default_rng(seed)
    noise = 0.2 * rng.standard_normal((count, image_vectors.shape[1])) / np.sqrt(image_vectors.shape[1])
    records = [
        CaptionRecord(
            text=f"caption {n} of cluster {int(clusters[n])}",
            source="synthetic-captions.txt",
            row=n,
            image=images[n].ref.path,
        )
        for n in range(count)
    ]
    return records, unit_rows(image_vectors[:count] + noise)


def tiny_clip_record(tiny_clip_dir: Path) -> dict:
    """The encoder record (spec, dim, fingerprint) of the tiny CLIP model, as a real build records it."""
    from retrieval.core.config import EncoderChoice
    from retrieval.encoders.registry import load_encoders
    from retrieval.store.provenance import encoder_record

    encoder, _ = load_encoders(EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"))
    return encoder_record(encoder)


def make_large_index(
    path: Path,
    tiny_clip_dir: Path,
    images: int = 100_000,
    captions: int = 10_000,
    index_type: str = "ivf",
    seed: int = 0,
) -> Path:
    """Write a CLIP index of ``images`` synthetic image vectors and ``captions`` captions at ``path`` (a new
    folder); its picture files go in ``path``'s sibling ``<name>-files``. Returns ``path``."""
    from retrieval.api.write import WriteOptions, write_index
    from retrieval.core.config import IndexOptions
    from retrieval.embed.embedded import EmbeddedItems

    path = Path(path)
    record = tiny_clip_record(tiny_clip_dir)
    vectors, clusters = clustered_vectors(images, int(record["dim"]), seed)
    rows = image_rows(path.parent / f"{path.name}-files", clusters)
    records, caption_vectors = caption_items(rows, vectors, clusters, captions)
    embedded = EmbeddedItems(
        images=rows,
        image_vectors=vectors,
        captions=records,
        caption_vectors=caption_vectors,
        encoders={"image": record, "text": record},
        shared_space=True,
    )
    options = WriteOptions(
        index_options=IndexOptions(index_type=index_type),
        checkpoint=str(tiny_clip_dir),
        progress=False,
        sources={"images": [str(path.parent / f"{path.name}-files")], "captions": []},
    )
    return write_index(embedded, path, options)


if __name__ == "__main__":  # python tests/large_index.py OUT_DIR [IMAGES]: make one by hand (and time it)
    import sys
    import tempfile
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_clip import make_tiny_clip

    out = Path(sys.argv[1])
    started = time.perf_counter()
    model = make_tiny_clip(Path(tempfile.mkdtemp(prefix="tiny-clip-")))
    make_large_index(out, model, int(sys.argv[2]) if len(sys.argv) > 2 else 100_000)
    print(f"{out}: written in {time.perf_counter() - started:.1f} s")
