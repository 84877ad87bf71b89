"""IVF list storage: float32 (``IVF4096,Flat``, what ``auto`` builds) against float16 (``IVF4096,SQfp16``).

The store keeps the vectors in float16, so ``SQfp16`` lists hold exactly the stored values: the same recall,
half the memory, and a list scan that reads half the bytes. Raw FAISS, both trained on the same sample rows
(``VectorSource.sample(32 x nlist, seed=0)``, as ``build_vector_index`` picks them) with the library's k-means
settings; recall@10 of the evaluation queries of ``ann_bench.py`` against exact search, batch-1 latency
(median of 300) and batch-1,000 QPS (median of 5) at each ``--nprobe``.

    python benchmarks/ann_ivf_storage.py            # 1M x 512, ~3 min
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see ann_bench.py

import argparse
import statistics
import sys
import time
from pathlib import Path

import ann_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.index.recall import recall_at
from retrieval.index.source import VectorSource
from retrieval.index.spec import spec_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--nprobe", default="12,16")
    args = parser.parse_args()
    import faiss

    parts = ann_data.load(args.n, args.d)
    source = VectorSource(parts)
    queries = ann_data.queries(1000, args.d, 0, 1000)
    truth = ann_data.truth(parts, queries, "eval1000")
    spec = spec_for("ivf", args.n, args.d)
    sample = source.sample(spec.train_size, seed=0)
    print(f"{args.n:,} x {args.d}, nlist {spec.nlist}, trained on {len(sample):,} rows\n")
    print("| lists | nprobe | build s | index MB | recall@10 | b1 ms | b1000 QPS |\n|---|---|---|---|---|---|---|")
    for storage in ("Flat", "SQfp16"):
        index = faiss.index_factory(args.d, spec.factory.replace(",Flat", f",{storage}"), faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter, ivf.cp.min_points_per_centroid = 10, 1
        started = time.perf_counter()
        index.train(sample)
        for chunk in source.chunks():
            index.add(chunk)
        build = time.perf_counter() - started
        size = faiss.serialize_index(index).nbytes / (1 << 20)
        for nprobe in (int(x) for x in args.nprobe.split(",")):
            ivf.nprobe = nprobe
            batch = []
            for _ in range(5):
                started = time.perf_counter()
                _, found = index.search(queries, 10)
                batch.append(time.perf_counter() - started)
            single = []
            for row in range(300):
                started = time.perf_counter()
                index.search(queries[row : row + 1], 10)
                single.append(time.perf_counter() - started)
            print(
                f"| {storage} | {nprobe} | {build:.0f} | {size:,.0f} | {recall_at(found, truth, 10):.4f} | "
                f"{statistics.median(single) * 1000:.3f} | {len(queries) / statistics.median(batch):,.0f} |",
                flush=True,
            )
        del index


if __name__ == "__main__":
    main()
