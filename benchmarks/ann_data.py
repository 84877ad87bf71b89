"""Synthetic CLIP-like embeddings for the ANN benchmarks, generated deterministically and cached as float16 shards.

Not iid Gaussian. Every vector is

    x = normalise( a * mu  +  c_k  +  s_k * (z * sqrt(lambda)) @ R_g(k) ),      z ~ N(0, I_d)

- ``mu``: one shared unit direction with weight ``a`` (the "cone" of CLIP embeddings: two unrelated
  items still have a positive cosine, median ~0.3 here);
- ``c_k``: the centre of cluster ``k`` of ``CLUSTERS`` (4,096) clusters arranged in a two-level hierarchy:
  ``SUPER`` (64) super-clusters drawn from the global power-law spectrum, each child centre = its parent
  plus its own power-law offset. Parents own an uneven number of children and cluster sizes follow a
  Zipf-like law (the largest cluster holds ~100x the mean, the smallest a handful of rows), as topics
  in a real photo collection do;
- the within-cluster noise has a power-law eigen-spectrum ``lambda_i ~ (1 + i / 4) ^ -1.5`` (24
  effective dimensions of 512 by the participation ratio, like the intrinsic dimension measured on CLIP
  embeddings), expressed in one of ``ROTATIONS`` (32) random orthonormal bases so clusters do not share
  their principal axes, and scaled by ``s_k`` (log-normal per cluster: some topics are tight, some diffuse).

With these constants the held-out queries' nearest neighbour at 1M has a cosine of ~0.8-0.95 (median
printed by ``python benchmarks/ann_data.py --stats``), as CLIP ViT-B image embeddings of a web
collection do, and IVF at nprobe=1 is far from recall 1.

Rows are generated in blocks of ``BLOCK`` rows, each from its own seed (``SeedSequence([seed, 0, block])``),
so a collection of ``n`` rows is always a prefix of a larger one; shards of ``SHARD`` rows are cached under
``index_data/bench/data_d{d}_s{seed}_{hash of the constants}/`` and reused by every benchmark. Queries come
from the same model with another seed stream (``[seed, 1, block]``), so they are never rows of the collection.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "index_data" / "bench"
BLOCK = 50_000
SHARD = 1_000_000
CLUSTERS = 4096
SUPER = 64
ROTATIONS = 32
SPECTRUM_KNEE = 4.0
SPECTRUM_POWER = 1.5
CONE = 0.7  # weight of the shared direction
SUPER_SCALE = 0.75  # norm of a super-cluster centre (before the cone)
CHILD_SCALE = 0.55  # norm of a child's offset from its parent
NOISE = 0.6  # median within-cluster noise norm
NOISE_SPREAD = 0.25  # log-normal sigma of the per-cluster noise scale
ZIPF = 0.9  # cluster size ~ rank ^ -ZIPF


def _spectrum(d: int) -> np.ndarray:
    lam = (1.0 + np.arange(d) / SPECTRUM_KNEE) ** -SPECTRUM_POWER
    return (lam / lam.sum()).astype(np.float32)  # total variance 1: a row of z * sqrt(lam) has norm ~1


def _rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


@dataclass
class Model:
    d: int
    seed: int
    mu: np.ndarray
    centres: np.ndarray  # (CLUSTERS, d)
    probs: np.ndarray  # (CLUSTERS,)
    scales: np.ndarray  # (CLUSTERS,)
    rotations: np.ndarray  # (ROTATIONS, d, d), each pre-multiplied by sqrt(lambda)
    rotation_of: np.ndarray  # (CLUSTERS,)


def model(d: int = 512, seed: int = 0) -> Model:
    """The fixed mixture (centres, sizes, spreads, local bases) every row and query of ``seed`` is drawn from."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    sq = np.sqrt(_spectrum(d))
    global_basis = _rotation(rng, d) * sq[:, None]
    mu = rng.standard_normal(d).astype(np.float32)
    mu /= np.linalg.norm(mu)
    parents = rng.standard_normal((SUPER, d)).astype(np.float32) @ global_basis * SUPER_SCALE
    # uneven number of children per parent
    parent_of = rng.choice(SUPER, size=CLUSTERS, p=rng.dirichlet(np.full(SUPER, 0.7)))
    children = parents[parent_of] + rng.standard_normal((CLUSTERS, d)).astype(np.float32) @ global_basis * CHILD_SCALE
    ranks = rng.permutation(CLUSTERS) + 1.0
    probs = ranks**-ZIPF
    probs /= probs.sum()
    scales = (NOISE * np.exp(rng.normal(0.0, NOISE_SPREAD, CLUSTERS))).astype(np.float32)
    rotations = np.stack([_rotation(rng, d) * sq[:, None] for _ in range(ROTATIONS)])
    rotation_of = rng.integers(0, ROTATIONS, CLUSTERS)
    return Model(d, seed, mu, children.astype(np.float32), probs, scales, rotations, rotation_of)


def _block(m: Model, stream: int, number: int, rows: int = BLOCK) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([m.seed, stream, number]))
    labels = rng.choice(CLUSTERS, size=rows, p=m.probs)
    z = rng.standard_normal((rows, m.d), dtype=np.float32)
    x = np.empty((rows, m.d), np.float32)
    groups = m.rotation_of[labels]
    for g in np.unique(groups):
        picked = np.flatnonzero(groups == g)
        x[picked] = z[picked] @ m.rotations[g]
    x *= m.scales[labels][:, None]
    x += m.centres[labels]
    x += CONE * m.mu
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _version() -> str:
    """A short hash of the generator's constants: a cache made with other constants is never reused."""
    import hashlib

    constants = (
        BLOCK,
        CLUSTERS,
        SUPER,
        ROTATIONS,
        SPECTRUM_KNEE,
        SPECTRUM_POWER,
        CONE,
        SUPER_SCALE,
        CHILD_SCALE,
        NOISE,
        NOISE_SPREAD,
        ZIPF,
    )
    return hashlib.sha1(repr(constants).encode()).hexdigest()[:8]


def data_dir(d: int, seed: int) -> Path:
    return CACHE / f"data_d{d}_s{seed}_{_version()}"


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def ensure_shards(n: int, d: int = 512, seed: int = 0, log=print) -> list[Path]:
    """Float16 shard files holding rows [0, n) (generating and caching what is missing), in order."""
    folder = data_dir(d, seed)
    folder.mkdir(parents=True, exist_ok=True)
    m = None
    paths = []
    for shard in range(math.ceil(n / SHARD)):
        start, stop = shard * SHARD, min((shard + 1) * SHARD, n)
        path = folder / f"shard_{shard:04d}.npy"
        paths.append(path)
        if path.exists() and np.load(path, mmap_mode="r").shape[0] >= stop - start:
            continue
        m = m or model(d, seed)
        started = time.perf_counter()
        # a shard is rewritten whole when a longer prefix is needed; blocks are independent, so earlier rows do
        # not change
        rows = stop - start
        out = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float16, shape=(rows, d))
        for offset in range(0, rows, BLOCK):
            block = _block(m, 0, (start + offset) // BLOCK)
            take = min(BLOCK, rows - offset)
            out[offset : offset + take] = block[:take]
        out.flush()
        del out
        os.replace(path.with_suffix(".tmp.npy"), path)
        log(f"generated {path.name}: {rows:,} x {d} float16 in {time.perf_counter() - started:.0f} s")
    return paths


def load(n: int, d: int = 512, seed: int = 0, log=print) -> list[np.ndarray]:
    """Memory-mapped float16 shards holding exactly rows [0, n)."""
    parts = []
    for number, path in enumerate(ensure_shards(n, d, seed, log)):
        part = np.load(path, mmap_mode="r")
        parts.append(part[: min(SHARD, n - number * SHARD)])
    return parts


def contiguous_path(n: int, d: int = 512, seed: int = 0) -> Path:
    return data_dir(d, seed) / f"all_{n}.npy"


def load_contiguous(n: int, d: int = 512, seed: int = 0, log=print) -> list[np.ndarray]:
    """Rows [0, n) as one memory-mapped float16 file, as a library build stores a vector set (the shards are
    copied into it once, streamed): FAISS re-ranks from such a file in place (``retrieval.index.faiss_views``)."""
    path = contiguous_path(n, d, seed)
    if not path.exists():
        parts = load(n, d, seed, log)  # generates the shards, and the folder, where missing
        log(f"copying the {n:,}-row shards into one file {path.name} (once)")
        tmp = path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))
        start = 0
        for part in parts:
            for offset in range(0, len(part), 1 << 18):
                block = part[offset : offset + (1 << 18)]
                out[start : start + len(block)] = block
                start += len(block)
        out.flush()
        del out
        os.replace(tmp, path)
    return [np.load(path, mmap_mode="r")]


def queries(count: int, d: int = 512, seed: int = 0, offset: int = 0) -> np.ndarray:
    """``count`` held-out float32 queries (rows ``offset``.. of the query stream): same model, never in the
    collection."""
    folder = data_dir(d, seed)
    folder.mkdir(parents=True, exist_ok=True)
    need = offset + count
    blocks = math.ceil(need / 10_000)
    path = folder / f"queries_{blocks * 10_000}.npy"
    if not path.exists():
        m = model(d, seed)
        _save(path, np.concatenate([_block(m, 1, b, 10_000) for b in range(blocks)]).astype(np.float16))
    return np.load(path)[offset:need].astype(np.float32)


def truth(parts: list[np.ndarray], q: np.ndarray, name: str, seed: int = 0, k: int = 10, log=print) -> np.ndarray:
    """Exact top-``k`` rows of ``q`` over ``parts`` (streamed brute force), cached under the data folder as ``name``."""
    import sys

    sys.path.insert(0, str(ROOT))
    from retrieval.index.recall import exact_search
    from retrieval.index.source import VectorSource

    n, d = sum(len(p) for p in parts), q.shape[1]
    path = data_dir(d, seed) / f"truth_{name}_n{n}_q{len(q)}_k{k}.npy"
    key = float(np.abs(q).sum())
    if path.exists():
        cached = np.load(path, allow_pickle=False)
        if cached.shape == (len(q), k + 1) and np.isclose(cached[0, -1].view(np.float64), key):
            return cached[:, :k]
    started = time.perf_counter()
    # in batches of 500 queries: exact_search's score blocks grow with the number of queries (~3 GB at 1,000)
    rows = np.concatenate([exact_search(VectorSource(parts), q[i : i + 500], k)[1] for i in range(0, len(q), 500)])
    log(f"exact ground truth for {len(q)} queries over {n:,} rows: {time.perf_counter() - started:.1f} s")
    stamp = np.full((len(q), 1), np.float64(key).view(np.int64), np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, np.concatenate([rows, stamp], axis=1))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats", action="store_true", help="print nearest-neighbour and random-pair cosines")
    args = parser.parse_args()
    parts = load(args.n, args.d, args.seed)
    if args.stats:
        import sys

        sys.path.insert(0, str(ROOT))
        from retrieval.index.recall import exact_search
        from retrieval.index.source import VectorSource

        q = queries(500, args.d, args.seed)
        source = VectorSource(parts)
        scores, _ = exact_search(source, q, 10)
        sample = source.sample(2000, seed=5)
        pairs = (sample[:1000] * sample[1000:]).sum(1)

        def pct(a: np.ndarray) -> str:
            return " ".join(f"p{p}={np.percentile(a, p):.3f}" for p in (5, 25, 50, 75, 95))

        print(f"n={len(source):,} d={args.d}")
        print(f"top-1 cosine of held-out queries: {pct(scores[:, 0])}")
        print(f"top-10 cosine:                    {pct(scores[:, 9])}")
        print(f"gap top-1 - top-10:               {pct(scores[:, 0] - scores[:, 9])}")
        print(f"random pair cosine:               {pct(pairs)}")
        lam = _spectrum(args.d)
        print(f"within-cluster effective dimension (participation ratio): {lam.sum() ** 2 / (lam**2).sum():.1f}")


if __name__ == "__main__":
    main()
