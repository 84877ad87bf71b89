"""``where=`` filters inside the search: latency p50 and recall@10 at 50/10/1/0.1% selectivity vs unfiltered search.

Data: ``benchmarks/ann_data.py`` (synthetic CLIP-like clustered embeddings, float16 shards, held-out queries).
For each index type (flat, ivf, hnsw by default) the index is built with the library's own build settings and
its knobs tuned to recall@10 >= 0.95 unfiltered (``measure_and_tune``, as a build does). Then, in ONE run:

- unfiltered: ``search()`` with the tuned knobs;
- filtered at each selectivity: a random set of allowed rows (uncorrelated with the vectors, like a date or a
  source column) searched with ``search_selected()`` (what ``Index`` does for ``where=``): an exact scan of the
  allowed rows when few pass, else FAISS with a bitmap ID selector and widened probes (see
  ``retrieval/index/selection.py``). The first query of a filter gathers its rows (once, then cached, as the
  ``Index`` does per predicate); that one-off cost is printed separately (``prepare ms``) and left out of p50.

Recall@10 is against numpy brute force over the allowed rows' stored float16 vectors. Latency is batch-1 p50
over ``--queries`` queries, the configurations interleaved query by query so machine load hits them alike;
the ratio column (filtered p50 / unfiltered p50 of the same index) is what to read on a loaded machine.

    python benchmarks/filters.py                       # 100k x 256, flat/ivf/hnsw (a few minutes on 2 cores)
    python benchmarks/filters.py --n 200000 --d 512
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see ann_bench.py: spinning OpenMP threads on a shared machine

import argparse
import sys
import time
from pathlib import Path

import ann_common as C
import ann_data
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.index.recall import RECALL_QUERIES, measure_and_tune
from retrieval.index.selection import Selection, exact_first, search_selected
from retrieval.index.source import VectorSource
from retrieval.index.spec import SearchKnobs, spec_for
from retrieval.index.vector_index import build_vector_index, search

K = 10
SHARES = (None, 0.5, 0.1, 0.01, 0.001)


def brute_force(data: np.ndarray, queries: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    rows = data if allowed is None else data[allowed]
    top = np.argsort(-(queries @ rows.T), axis=1, kind="stable")[:, :K]
    return top if allowed is None else allowed[top]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def run_type(
    index_type: str, source: VectorSource, data: np.ndarray, queries: np.ndarray, tune: np.ndarray, seed: int
) -> list[list]:
    spec = spec_for(index_type, len(source), source.dim)
    started = time.perf_counter()
    index = build_vector_index(source, spec)
    report = measure_and_tune(index, spec, source, tune, "held-out", 0.95) if not spec.exact else None
    knobs = report.knobs if report is not None else SearchKnobs()
    print(
        f"{index_type}: built and tuned in {time.perf_counter() - started:.1f} s, knobs {knobs.to_json()}", flush=True
    )
    rng = np.random.default_rng(seed)
    selections: dict[float | None, Selection | None] = {None: None}
    prepare_ms: dict[float | None, float] = {None: 0.0}
    for share in SHARES[1:]:
        allowed = np.flatnonzero(rng.random(len(source)) < share)
        selections[share] = Selection(allowed, len(source))
        begin = time.perf_counter()
        search_selected(
            index, queries[:1], K, knobs, selections[share], source
        )  # gathers (and caches) the allowed rows
        prepare_ms[share] = (time.perf_counter() - begin) * 1e3

    def runner(selection: Selection | None):
        if selection is None:
            return lambda q: search(index, q, K, knobs)
        return lambda q: search_selected(index, q, K, knobs, selection, source)

    latencies = C.interleaved_latencies({str(share): runner(sel) for share, sel in selections.items()}, queries)
    base = C.median(latencies["None"])
    rows = []
    for share, selection in selections.items():
        found = np.concatenate([runner(selection)(queries[i : i + 64])[1] for i in range(0, len(queries), 64)])
        truth = brute_force(data, queries, None if selection is None else selection.positions)
        p50 = C.median(latencies[str(share)])
        how = "-" if selection is None else ("exact scan" if exact_first(index, selection) else "selector")
        rows.append(
            [
                index_type,
                "unfiltered" if share is None else f"{share:.1%}",
                len(source) if selection is None else len(selection),
                how,
                f"{p50 * 1e3:.3f}",
                f"{p50 / base:.2f}",
                f"{recall(found, truth):.3f}",
                f"{prepare_ms[share]:.1f}",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--types", default="flat,ivf,hnsw")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    parts = ann_data.load(args.n, args.d)
    source = VectorSource(parts)
    data = source.all()
    tune = ann_data.queries(RECALL_QUERIES, args.d)
    queries = ann_data.queries(args.queries, args.d, offset=RECALL_QUERIES)
    print(f"{args.n:,} x {args.d} vectors, {len(queries)} queries, k={K}, load {C.loadavg():.1f}", flush=True)
    rows = []
    for index_type in args.types.split(","):
        rows += run_type(index_type, source, data, queries, tune, args.seed)
    print(
        C.table(["index", "selectivity", "allowed", "path", "p50 ms", "vs unfiltered", "recall@10", "prepare ms"], rows)
    )


if __name__ == "__main__":
    main()
