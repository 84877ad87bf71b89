"""An IVF index larger than a process's memory limit is searched memory-mapped; loaded in full it is OOM-killed.

1. Build IVF-Flat over ``--n`` cached vectors (``benchmarks/ann_data.py``; 2M x 512 gives a ~4 GB file) with
   ``build_vector_index``, tune nprobe with ``measure_and_tune`` (recall@10 >= 0.95), write it with
   ``faiss.write_index``, and keep the in-memory index's answers to the evaluation queries as a reference.
2. Drop the index file from the page cache (``posix_fadvise(DONTNEED)``: its pages would otherwise stay charged
   to this process's cgroup and the child would read them for free), then run a child process under a memory
   limit of ``--limit`` (default 1GB, a quarter of the file) that opens it with ``read_vector_index(path,
   mmap=True)`` and answers the queries: recall@10 against exact search over all rows, agreement with the
   in-memory index, latency (first pass from disk, then warm).
3. The same child with ``read_vector_index(path, mmap=False)`` under the same limit: it must be OOM-killed.

How the limit is enforced: ``RLIMIT_AS`` cannot be used (a memory map counts against the address space, so it
would refuse the map itself, not the resident memory). This machine has no systemd (``systemd-run --scope -p
MemoryMax=`` fails: "System has not been booted with systemd") and no Docker daemon; the cgroup v2 hierarchy
(``/sys/fs/cgroup/unified``) has no memory controller; the cgroup v1 memory controller is mounted writable at
``/sys/fs/cgroup/memory``. So the child runs in a new memory cgroup created *inside this process's own*
memory cgroup (limits nest, nothing above it is touched), v1 ``memory.limit_in_bytes`` (or v2 ``memory.max``
where v2 has the memory controller), removed afterwards. The kernel charges both anonymous memory and the
page cache the child faults in; page cache is reclaimable, anonymous memory is not (no swap), hence: mmap
works, a full load is OOM-killed.

    sudo-less root:  python benchmarks/mmap_bench.py                   # 2M x 512 (~4 GB index), ~10 min
                     python benchmarks/mmap_bench.py --n 300000 --limit 200MB   # dry run
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see ann_bench.py

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import ann_common as C
import ann_data
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.index.recall import RECALL_QUERIES, measure_and_tune, recall_at
from retrieval.index.source import VectorSource
from retrieval.index.spec import SearchKnobs, parse_memory, spec_for
from retrieval.index.vector_index import build_vector_index, read_vector_index, search

ROOT = Path(__file__).resolve().parents[1]
K = 10
TARGET = 0.95
EVAL_OFFSET = 1000
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.0f} s] {message}", file=sys.stderr, flush=True)


# -- the child -----------------------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    meta = json.loads(Path(args.meta).read_text())
    knobs = SearchKnobs.from_json(meta["knobs"])
    started = time.perf_counter()
    index = read_vector_index(args.index, mmap=args.child == "mmap")
    status = C.proc_status()
    print("LOADED " + json.dumps({"seconds": time.perf_counter() - started, "status": status}), flush=True)
    parts = ann_data.load(args.n, args.d, args.seed, log)
    eval_q = ann_data.queries(args.queries, args.d, args.seed, EVAL_OFFSET)
    truth = ann_data.truth(parts, eval_q, f"eval{EVAL_OFFSET}", args.seed, K, log)
    reference = np.load(meta["reference"])

    def run(q: np.ndarray) -> np.ndarray:
        return search(index, q, K, knobs)[1]

    first = C.single_latencies(run, eval_q[: args.single])
    warm = C.single_latencies(run, eval_q[: args.single])
    started = time.perf_counter()
    found = run(eval_q)
    batch_s = time.perf_counter() - started
    result = {
        "recall@10": recall_at(found, truth, K),
        "same_as_in_memory": float(np.mean(found[: len(reference)] == reference[: len(found)])),
        "b1_latency_ms_first_pass": C.median(first) * 1000,
        "b1_latency_ms_warm": C.median(warm) * 1000,
        "b1_samples": len(warm),
        "batch_qps": len(eval_q) / batch_s,
        "status": C.proc_status(),
    }
    print("CHILD_RESULT " + json.dumps(result), flush=True)


# -- main ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--limit", default="1GB,3GB", help="memory limits of the search process, comma-separated (default 1GB,3GB)"
    )
    parser.add_argument("--queries", type=int, default=200, help="evaluation queries (= the batch), default 200")
    parser.add_argument(
        "--single", type=int, default=50, help="batch-1 queries per pass (first pass, then warm), default 50"
    )
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="default benchmarks/results/mmap_bench_n{n}_d{d}.json")
    parser.add_argument("--child", choices=["mmap", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    parser.add_argument("--meta", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    import faiss

    n, d = args.n, args.d
    limits = [parse_memory(text) for text in args.limit.split(",")]
    json_path = args.json or ROOT / "benchmarks" / "results" / f"mmap_bench_n{n}_d{d}.json"
    work = ann_data.CACHE / "mmap_bench"
    work.mkdir(parents=True, exist_ok=True)
    stem = f"ivf_{ann_data.data_dir(d, args.seed).name}_n{n}"
    path, meta_path = work / f"{stem}.faiss", work / f"{stem}.json"
    parts = ann_data.load(n, d, args.seed, log)
    source = VectorSource(parts)
    eval_q = ann_data.queries(args.queries, d, args.seed, EVAL_OFFSET)
    if args.rebuild or not (path.exists() and meta_path.exists()):
        spec = spec_for("ivf", n, d)
        log(f"building {spec.factory} over {n:,} x {d}")
        build_s, _, index = C.timed(lambda: build_vector_index(source, spec))
        faiss.write_index(index, str(path))
        report = measure_and_tune(
            index, spec, source, ann_data.queries(RECALL_QUERIES, d, args.seed, 0), "held-out queries", TARGET
        )
        reference = search(index, eval_q, K, report.knobs)[1]
        np.save(work / f"{stem}.reference.npy", reference)
        meta_path.write_text(
            json.dumps(
                {
                    "spec": spec.to_json(),
                    "knobs": report.knobs.to_json(),
                    "build_s": build_s,
                    "tuning": report.to_json(),
                    "reference": str(work / f"{stem}.reference.npy"),
                }
            )
        )
        del index
        C.trim()
    meta = json.loads(meta_path.read_text())
    ann_data.truth(parts, eval_q, f"eval{EVAL_OFFSET}", args.seed, K, log)  # cached for the children
    size = path.stat().st_size
    log(f"index {path.name}: {size / (1 << 30):.2f} GiB, knobs {meta['knobs']}; search process limits {args.limit}")
    if size <= max(limits):
        log(
            f"warning: the index ({size:,} bytes) is not larger than every limit ({args.limit}); "
            "raise --n or lower --limit"
        )

    common = [
        sys.executable,
        __file__,
        "--index",
        str(path),
        "--meta",
        str(meta_path),
        "--n",
        str(n),
        "--d",
        str(d),
        "--seed",
        str(args.seed),
        "--queries",
        str(args.queries),
        "--single",
        str(args.single),
    ]
    result: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("child", "index", "meta")},
        "machine": C.machine(),
        "library_sha1": C.library_fingerprint(ROOT),
        "index_file_bytes": size,
        "limits_bytes": limits,
        "index": meta,
    }
    runs = {}
    for limit in limits:
        for mode in ("mmap", "load"):
            C.drop_from_page_cache(path)
            log(f"child: read_vector_index(mmap={mode == 'mmap'}) under a {limit / (1 << 30):.2f} GiB memory cgroup")
            r = runs[f"{mode}@{limit}"] = C.run_limited(
                limit, common + ["--child", mode], f"ann_mmap_bench_{os.getpid()}_{mode}"
            )
            r["limit_bytes"] = limit
            log(f"  -> returncode {r['returncode']} {r.get('signal', '')}, cgroup {r['cgroup']}")
    result["runs"] = runs
    print_report(result)
    C.write_json(json_path, result)
    log(f"wrote {json_path}")


def print_report(result: dict[str, Any]) -> None:
    GB = 1 << 30
    runs = result["runs"]
    version = next(iter(runs.values()))["cgroup_version"]
    print(f"\n## IVF index larger than the search process's memory limit (cgroup v{version} memory limit)\n")
    print(
        f"index file {result['index_file_bytes'] / GB:.2f} GiB ({result['index']['spec']['factory']}, "
        f"{int(result['args']['n']):,} x {result['args']['d']}), knobs tuned in memory to recall@10 >= 0.95: "
        f"{json.dumps(result['index']['knobs'])}; {result['args']['queries']} held-out queries\n"
    )
    rows = []
    ok = True
    for limit in result["limits_bytes"]:
        m, full = runs[f"mmap@{limit}"], runs[f"load@{limit}"]
        cm = m.get("child_result")
        killed = full["returncode"] < 0 and full["cgroup"]["oom_kill"] > 0 and not full.get("loaded")
        ok = ok and bool(cm) and m["returncode"] == 0 and killed
        rows.append(
            [
                f"{limit / GB:.2f} GiB",
                f"{limit / result['index_file_bytes']:.0%}",
                "ok" if m["returncode"] == 0 else f"{m['returncode']} {m.get('signal', '')}",
                f"{cm['recall@10']:.4f}" if cm else "-",
                f"{cm['same_as_in_memory']:.2%}" if cm else "-",
                f"{cm['b1_latency_ms_first_pass']:.1f} / {cm['b1_latency_ms_warm']:.1f}" if cm else "-",
                f"{cm['batch_qps']:,.0f}" if cm else "-",
                f"{cm['status']['VmHWM'] / GB:.2f}" if cm else "-",
                f"{m['cgroup']['peak_bytes'] / GB:.2f}",
                f"{full['returncode']} {full.get('signal', '')}" + (", OOM-killed while reading" if killed else ""),
            ]
        )
    print(
        C.table(
            [
                "limit",
                "of index",
                "mmap=True exit",
                "recall@10",
                "same as in-memory",
                "b1 ms first/warm",
                f"b{result['args']['queries']} QPS",
                "VmHWM GiB",
                "cgroup peak GiB",
                "mmap=False (full load)",
            ],
            rows,
        )
    )
    verdict = (
        "MET: the memory-mapped index answers under every limit; the full load is OOM-killed under each"
        if ok
        else "NOT SHOWN: see the rows above"
    )
    result["verdict"] = verdict
    print(f"\n- {verdict}")


if __name__ == "__main__":
    main()
