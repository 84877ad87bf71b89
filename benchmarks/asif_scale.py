"""ASIF at scale: the exact sparse route, its pruned variant and the projected route against plain FAISS.

Usage (from the repository root):

    PYTHONPATH=$PWD python benchmarks/asif_scale.py --quick            # 20k items x {1k, 10k} anchors, ~2 min
    PYTHONPATH=$PWD python benchmarks/asif_scale.py                    # {100k, 1M} items x {1k, 10k, 100k} anchors
    PYTHONPATH=$PWD python benchmarks/asif_scale.py --items 1000000 --anchors 100000   # one point

Each grid point runs in its own subprocess (so its peak RSS is its own) and prints one JSON line;
the driver prints the tables and writes ``benchmarks/results/asif_scale*.json``.

Data: the clustered mixture of ``benchmarks/ann_data.py`` (4,096 Zipf-sized clusters in a two-level
hierarchy, power-law spectra) at dimension ``--dim`` (64 by default: the sparse route does not depend
on it; building the relative rows and the dense routes do). Items, image anchors and queries are
independent draws of the same mixture; the "text" anchors paired with the image anchors are a random
rotation of them plus noise, so the projected route has another space to land in. Relative rows: k
(default 100) per row, p = 2, built with the library (``AnchorSpace.relative``: exact FAISS top-k
over the anchors) below ``--ivf-from`` anchors; from there (10k by default) the items' rows come
from a FAISS IVF top-k (nprobe 16) to keep the build within minutes on 2 cores, with its overlap
with the exact top-k and the library's exact build time measured on ``--exact-sample`` items. Then
they are turned into posting lists (float16 values, int32 row ids), saved and memory-mapped
back (``SparseRelativeIndex.load``) before any query is timed.

Routes timed per query (batch 1: ``--single`` queries one at a time; batch ``--batch``: one call):
- ``sparse``: query relative row (FAISS top-k over the anchors) + exact posting-list search;
- ``approx@R``: the same with ``candidates=R`` (approximate: dense sketch, R candidates rescored exactly),
  with its recall@10 against ``sparse`` (the sketch is built once per point, timed as ``sketch_in_memory``);
- ``projected``: query relative row, projected into the other space, FAISS IndexFlatIP over the
  projected items;
- ``faiss``: FAISS IndexFlatIP over the raw item vectors with the raw queries (the reference).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # on 2 shared cores, threaded BLAS on small products ran 10x slower

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BLOCK = 50_000


def _vectors(model, stream: int, n: int) -> np.ndarray:
    import ann_data

    blocks = [ann_data._block(model, stream, b, min(BLOCK, n - b * BLOCK)) for b in range((n + BLOCK - 1) // BLOCK)]
    return np.concatenate(blocks)


def _relative_rows(space, vectors: np.ndarray, modality: str, params, chunk: int = 100_000) -> sp.csr_matrix:
    parts = [space.relative(vectors[i : i + chunk], modality, params) for i in range(0, len(vectors), chunk)]
    return sp.vstack(parts).tocsr()


def _ivf_relative_rows(anchors: np.ndarray, vectors: np.ndarray, k: int, p: float, nprobe: int, chunk: int = 100_000):
    """Relative rows from an IVF top-k over the anchors (approximate; the benchmark's shortcut at >= 10k anchors).

    The same clip / power / L2-normalise as the library; returns (CSR rows, seconds).
    """
    import faiss

    t0 = time.perf_counter()
    nlist = int(4 * np.sqrt(len(anchors)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(anchors.shape[1]), anchors.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(anchors)
    index.add(anchors)
    index.nprobe = nprobe
    parts = []
    for start in range(0, len(vectors), chunk):
        scores, ids = index.search(vectors[start : start + chunk], k)
        w = np.maximum(scores.astype(np.float64), 0.0) ** p
        w[ids < 0] = 0.0
        w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-30)
        rows = np.repeat(np.arange(len(ids)), k)
        keep = w.ravel() > 0
        parts.append(
            sp.csr_matrix(
                (w.ravel()[keep].astype(np.float32), (rows[keep], ids.ravel()[keep])), shape=(len(ids), len(anchors))
            )
        )
    return sp.vstack(parts).tocsr(), time.perf_counter() - t0


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def _time_single(fn, queries) -> dict[str, float]:
    fn(queries[:1])  # warm-up
    times = []
    for i in range(queries.shape[0]):
        t = time.perf_counter()
        fn(queries[i : i + 1])
        times.append(time.perf_counter() - t)
    return _percentiles(times)


def _time_batch(fn, queries) -> float:
    t = time.perf_counter()
    fn(queries)
    return (time.perf_counter() - t) * 1e3 / queries.shape[0]


def _recall(approx: np.ndarray, exact: np.ndarray, at: int = 10) -> float:
    return float(np.mean([len(set(a[:at]) & set(e[:at])) / at for a, e in zip(approx, exact, strict=True)]))


def _build(args) -> dict:
    """Data, relative rows, posting lists (saved and memory-mapped), the dense indexes."""
    import ann_data
    import faiss

    from retrieval.asif.projection import normalize_rows
    from retrieval.asif.relative import AnchorSpace, AsifParams, SparseRelativeIndex

    model = ann_data.model(args.dim, seed=0)
    items = _vectors(model, 10, args.point_items)
    image_anchors = _vectors(model, 11, args.point_anchors)
    queries = _vectors(model, 12, max(args.single, args.batch))
    rng = np.random.default_rng(1)
    rotation = np.linalg.qr(rng.standard_normal((args.dim, args.dim)))[0].astype(np.float32)
    text_anchors = normalize_rows(
        image_anchors @ rotation + 0.2 * rng.standard_normal(image_anchors.shape).astype(np.float32) / np.sqrt(args.dim)
    )
    space = AnchorSpace(image_anchors, text_anchors)
    params = AsifParams(k=args.k, p=2.0)
    sample = items[: args.exact_sample]
    t0 = time.perf_counter()
    exact_sample = _relative_rows(space, sample, "image", params)
    t_exact_per_100k = (time.perf_counter() - t0) * 100_000 / len(sample)
    ivf_overlap = None
    if args.point_anchors >= args.ivf_from:
        rows, t_rows = _ivf_relative_rows(image_anchors, items, args.k, 2.0, args.nprobe)
        approx = rows[: len(sample)]
        ivf_overlap = float(
            np.mean(
                [
                    len(set(approx[i].indices) & set(exact_sample[i].indices)) / exact_sample[i].nnz
                    for i in range(len(sample))
                ]
            )
        )
    else:
        t0 = time.perf_counter()
        rows = _relative_rows(space, items, "image", params)
        t_rows = time.perf_counter() - t0
    t0 = time.perf_counter()
    projected = np.concatenate(
        [
            normalize_rows(np.asarray(rows[i : i + 100_000] @ text_anchors, dtype=np.float32))
            for i in range(0, rows.shape[0], 100_000)
        ]
    )
    t_proj = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = SparseRelativeIndex(rows)
    t_lists = time.perf_counter() - t0
    folder = Path(tempfile.mkdtemp(prefix="asif_scale_", dir=args.tmp))
    path = folder / f"rows{SparseRelativeIndex.file_suffix}"
    index.save(path)
    csr_bytes = rows.data.nbytes + rows.indices.nbytes + rows.indptr.nbytes
    del index, rows
    mapped = SparseRelativeIndex.load(path)
    t0 = time.perf_counter()
    mapped.sketch()
    t_sketch = time.perf_counter() - t0
    flat_proj = faiss.IndexFlatIP(args.dim)
    flat_proj.add(projected)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(items)
    del projected
    return {
        "space": space,
        "params": params,
        "mapped": mapped,
        "path": path,
        "queries": queries,
        "flat": flat,
        "flat_proj": flat_proj,
        "text_anchors": text_anchors,
        "rows_built_with": "faiss-ivf" if ivf_overlap is not None else "library-exact",
        "ivf_top_k_overlap_with_exact": ivf_overlap,
        "build_s": {
            "relative_rows": t_rows,
            "library_exact_rows_per_100k_items": t_exact_per_100k,
            "posting_lists": t_lists,
            "projected_vectors": t_proj,
            "sketch_in_memory": t_sketch,
        },
        "bytes": {
            "postings_file": path.stat().st_size,
            "postings_arrays": mapped.postings.nbytes,
            "csr_float32_in_memory": int(csr_bytes),
        },
    }


def _point(args) -> dict:
    """Measure one (items, anchors) point; returns the JSON record."""
    from retrieval.asif.projection import normalize_rows

    b = _build(args)
    space, params, mapped, queries = b["space"], b["params"], b["mapped"], b["queries"]
    k_out = 10

    def rel(q):
        return space.relative(q, "image", params)

    routes = {
        "sparse": lambda q: mapped.search(rel(q), k_out),
        "projected": lambda q: b["flat_proj"].search(
            normalize_rows(np.asarray(rel(q) @ b["text_anchors"])).astype(np.float32), k_out
        ),
        "faiss": lambda q: b["flat"].search(q, k_out),
    }
    for count in args.candidates:
        routes[f"approx@{count}"] = lambda q, count=count: mapped.search(rel(q), k_out, candidates=count)
    single, batch = queries[: args.single], queries[: args.batch]
    out = {
        "items": args.point_items,
        "anchors": args.point_anchors,
        "k": args.k,
        "dim": args.dim,
        **b["bytes"],
        "build_s": b["build_s"],
        "rows_built_with": b["rows_built_with"],
        "ivf_top_k_overlap_with_exact": b["ivf_top_k_overlap_with_exact"],
        "single": {},
        "batch_ms_per_query": {},
        "recall_at_10_vs_sparse": {},
    }
    rel_single = rel(single)
    lists = mapped.postings
    lengths = np.diff(np.asarray(lists.indptr))
    out["postings_read_per_query_mean"] = float(
        np.mean([lengths[rel_single[i].indices].sum() for i in range(len(single))])
    )
    out["single"]["query_relative_row"] = _time_single(rel, single)
    out["single"]["sparse_search_only"] = _time_single(lambda r: mapped.search(r, k_out), rel_single)
    for name, fn in routes.items():
        out["single"][name] = _time_single(fn, single)
        out["batch_ms_per_query"][name] = _time_batch(fn, batch[: args.sparse_batch] if name == "sparse" else batch)
    _, exact = mapped.search(rel_single, k_out)
    for count in args.candidates:
        out["recall_at_10_vs_sparse"][f"approx@{count}"] = _recall(
            mapped.search(rel_single, k_out, candidates=count)[1], exact
        )
    out["recall_at_10_vs_sparse"]["projected"] = _recall(routes["projected"](single)[1], exact)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    b["path"].unlink()
    b["path"].parent.rmdir()
    return out


def _table(records: list[dict]) -> str:
    lines = [
        "| items | anchors | rows file MB | build s (rows + lists) | peak RSS GB | postings read/query | route "
        "| p50 ms | p99 ms | batch ms/query | vs faiss p50 | recall@10 vs exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        faiss_p50 = r["single"]["faiss"]["p50_ms"]
        for name, t in r["single"].items():
            lines.append(
                f"| {r['items']:,} | {r['anchors']:,} | {r['postings_file'] / 1e6:.0f} | "
                f"{r['build_s']['relative_rows']:.0f} + {r['build_s']['posting_lists']:.1f} | "
                f"{r['peak_rss_bytes'] / 2**30:.1f} | "
                f"{r['postings_read_per_query_mean']:,.0f} | {name} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | "
                f"{r['batch_ms_per_query'].get(name, float('nan')):.2f} | {t['p50_ms'] / faiss_p50:.2f}x | "
                f"{r['recall_at_10_vs_sparse'].get(name, 1.0 if name == 'sparse' else float('nan')):.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k items x {1k, 10k} anchors, 50 queries")
    parser.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--anchors", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--single", type=int, default=100, help="batch-1 queries per route")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--candidates", type=int, nargs="*", default=[300, 1000], help="approximate route settings")
    parser.add_argument(
        "--sparse-batch", type=int, default=1000, help="queries in the exact route's batch (it is a per-query loop)"
    )
    parser.add_argument(
        "--ivf-from",
        type=int,
        default=10_000,
        help="build the items' rows with a FAISS IVF top-k from this many anchors",
    )
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument(
        "--exact-sample",
        type=int,
        default=2000,
        help="items whose rows the library builds exactly (timing, IVF overlap)",
    )
    parser.add_argument("--tmp", default=None, help="folder for the posting-list files (default: system temp)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--point-items", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--point-anchors", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point_items:
        print(json.dumps(_point(args)), flush=True)
        return
    if args.quick:
        args.items, args.anchors, args.single, args.batch = [20_000], [1_000, 10_000], 50, 200
    records = []
    out = args.out or HERE / "results" / ("asif_scale_quick.json" if args.quick else "asif_scale.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    passthrough = [
        "--dim",
        str(args.dim),
        "--k",
        str(args.k),
        "--single",
        str(args.single),
        "--batch",
        str(args.batch),
        "--sparse-batch",
        str(args.sparse_batch),
        "--ivf-from",
        str(args.ivf_from),
        "--nprobe",
        str(args.nprobe),
        "--exact-sample",
        str(args.exact_sample),
        "--candidates",
        *map(str, args.candidates),
    ] + (["--tmp", args.tmp] if args.tmp else [])
    for n in args.items:
        for n_anchors in args.anchors:
            cmd = [sys.executable, __file__, "--point-items", str(n), "--point-anchors", str(n_anchors), *passthrough]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            record = json.loads(done.stdout.strip().splitlines()[-1])
            record["wall_s"] = time.perf_counter() - t0
            records.append(record)
            print(f"{n:,} items x {n_anchors:,} anchors: {record['wall_s']:.0f} s", file=sys.stderr, flush=True)
            out.write_text(json.dumps({"load_avg_at_end": os.getloadavg(), "records": records}, indent=1) + "\n")
    print(_table(records))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
