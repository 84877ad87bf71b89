"""10M x 512 vectors under a 4 GB index budget: auto index from memory-mapped float16 shards on disk.

Data: ``benchmarks/ann_data.py`` (synthetic CLIP-like embeddings, see there), generated streamingly into
float16 shards of 1M rows under ``index_data/bench/`` (10M x 512 x 2 bytes = 10 GB on disk; no step ever
holds the collection in float32), then copied once into one contiguous float16 file, the layout a library
build stores a vector set in. Then, as a build of the library does:

1. ``choose_index(n, d, parse_memory(--max-memory), --target)`` (at 10M / 4GB: OPQ + IVF + PQ, the shortlist
   re-ranked from the float16 vectors on disk);
2. ``build_vector_index(VectorSource([np.load(file, mmap_mode="r")]), spec)`` (trains on a sample, adds
   in chunks), written with ``faiss.write_index``;
3. ``measure_and_tune(..., target_recall=--target)`` on ``RECALL_QUERIES`` held-out queries (its ground truth is
   ``exact_search`` streamed over the shards);
4. evaluation on ``--queries`` other held-out queries: recall@10 against exact search, latency at batch 1
   (median of ``--single``), QPS at batch ``--queries``;
5. a fresh child process opens the written index with ``read_vector_index(path, mmap=True)``, re-ranks from
   the memory-mapped float16 file (FAISS ``IndexRefine`` viewing it in place) and reports its own peak memory:
   what a search process holds within the budget.

Memory: peak RSS from ``resource.getrusage`` (= VmHWM) counts the resident pages of the memory-mapped shards
too (page cache the kernel can drop, streamed through by the build and by exact search), so peak anonymous
memory (RssAnon, sampled every 0.2 s) is reported next to it per phase.

    nohup python benchmarks/ann_10m.py > index_data/bench/ann_10m.log 2>&1 &     # ~40-60 min on 2 cores
    python benchmarks/ann_10m.py --n 500000                                        # dry run, ~3 min
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # see ann_bench.py: spinning OpenMP threads on a shared 2-core machine

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import ann_common as C
import ann_data
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.index.recall import RECALL_QUERIES, measure_and_tune, recall_at
from retrieval.index.source import VectorSource
from retrieval.index.spec import IndexSpec, SearchKnobs, choose_index, parse_memory
from retrieval.index.vector_index import build_vector_index, read_vector_index, search

ROOT = Path(__file__).resolve().parents[1]
K = 10
SEARCH_PROCESS_PHASE_SECONDS = 120  # each phase of a memory-limited search process stops after this long
TUNE_QUERIES = RECALL_QUERIES  # what a build tunes with (rows 0.. of the query stream)
EVAL_OFFSET = 1000
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.0f} s] {message}", file=sys.stderr, flush=True)


def evaluate(
    index: Any,
    spec: IndexSpec,
    knobs: SearchKnobs,
    source: VectorSource,
    eval_q: np.ndarray,
    truth: np.ndarray,
    single: int,
    rounds: int,
    time_budget: float | None = None,
) -> dict[str, Any]:
    """Recall@10, batch-1 latency (first pass, then warm) and batch throughput of ``search()`` with ``knobs``.

    With ``time_budget`` (seconds per phase) a phase stops early and the batch runs in blocks of 100 queries,
    so a search process that reads every re-ranked row from disk still finishes; the answered counts are reported.
    """
    rerank_with = source if spec.rerank else None

    def run(q: np.ndarray) -> np.ndarray:
        return search(index, q, K, knobs, rerank_with=rerank_with)[1]

    def singles() -> list[float]:
        times: list[float] = []
        started = time.perf_counter()
        for q in eval_q[:single]:
            begin = time.perf_counter()
            run(q[None, :])
            times.append(time.perf_counter() - begin)
            if time_budget and time.perf_counter() - started > time_budget:
                break
        return times

    cold = singles()  # first touch of the lists / rows this process needs
    log(f"first pass: {len(cold)} single queries, median {C.median(cold) * 1000:.2f} ms")
    warm: list[float] = []
    batch: list[float] = []
    found = None
    step = 100 if time_budget else len(eval_q)
    for _ in range(rounds):
        warm += singles()
        started = time.perf_counter()
        blocks = []
        for offset in range(0, len(eval_q), step):
            blocks.append(run(eval_q[offset : offset + step]))
            if time_budget and time.perf_counter() - started > time_budget:
                break
        got = np.concatenate(blocks)
        batch.append(len(got) / (time.perf_counter() - started))
        found = got if found is None else found
        log(f"batch: {len(got)} queries, {batch[-1]:,.0f} QPS")
    latency = C.median(warm)
    return {
        "recall@10": recall_at(found, truth[: len(found)], K),
        "recall_queries": len(found),
        "b1_latency_ms": latency * 1000,
        "b1_qps": 1 / latency,
        "b1_latency_ms_first_pass": C.median(cold) * 1000,
        "b1_samples": len(warm),
        "b1_samples_first_pass": len(cold),
        "batch": step,
        "batch_qps": C.median(batch),
        "found_head": found[:50].tolist(),
    }


def child(args: argparse.Namespace) -> None:
    """A fresh search process: open the index memory-mapped, re-rank from the memory-mapped vectors, report memory."""
    spec_data = json.loads(args.child_spec)
    spec, knobs = IndexSpec.from_json(spec_data["spec"]), SearchKnobs.from_json(spec_data["knobs"])
    monitor = C.MemoryMonitor()
    started = time.perf_counter()
    index = read_vector_index(args.child, mmap=True)
    opened = time.perf_counter() - started
    parts = ann_data.load_contiguous(args.n, args.d, args.seed, log)
    if args.madv_random:  # no readahead around each re-ranked row (a benchmark-side setting of the memory maps)
        import mmap

        for part in parts:
            part._mmap.madvise(mmap.MADV_RANDOM)
    source = VectorSource(parts)
    eval_q = ann_data.queries(args.queries, args.d, args.seed, EVAL_OFFSET)
    truth = ann_data.truth(parts, eval_q, f"eval{EVAL_OFFSET}", args.seed, K, log)
    result = evaluate(index, spec, knobs, source, eval_q, truth, args.single, args.rounds, args.time_budget)
    # VmHWM, not getrusage: ru_maxrss survives exec and would report the parent's peak at fork time
    result.update(open_s=opened, peak=monitor.peak(), vm_hwm=C.proc_status()["VmHWM"], status=C.proc_status())
    print("CHILD_RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-memory", default="4GB")
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="default benchmarks/results/ann_10m_n{n}_d{d}.json")
    parser.add_argument(
        "--search-only",
        action="store_true",
        help="skip the build: rerun only the search processes on the index and knobs of the last run",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--madv-random", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--time-budget", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    import faiss

    n, d = args.n, args.d
    budget = parse_memory(args.max_memory)
    json_path = args.json or ROOT / "benchmarks" / "results" / f"ann_10m_n{n}_d{d}.json"
    work = ann_data.CACHE / f"ann_10m_n{n}_d{d}"
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items() if not k.startswith("child")},
        "machine": C.machine(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "library_sha1": C.library_fingerprint(ROOT),
        "phases": {},
    }
    if args.search_only:
        result = json.loads(json_path.read_text())
        run_search_processes(result, args, work / "index.faiss", budget)
        C.write_json(json_path, result)
        report_tables(result, budget)
        C.write_json(json_path, result)
        return
    monitor = C.MemoryMonitor()
    phases = result["phases"]

    def phase(name: str, fn):
        monitor.reset()
        wall, cpu, out = C.timed(fn)
        peak = monitor.peak()
        phases[name] = {
            "wall_s": wall,
            "cpu_s": cpu,
            "peak_rss_anon_bytes": peak["anon"],
            "peak_rss_file_bytes": peak["file"],
            "peak_vmrss_bytes": peak["total"],
            "ru_maxrss_bytes_so_far": C.peak_rss_bytes(),
            "loadavg_after": C.loadavg(),
        }
        log(
            f"{name}: {wall:.0f} s, peak RssAnon {peak['anon'] / C.MB:,.0f} MB, "
            f"peak RssFile {peak['file'] / C.MB:,.0f} MB"
        )
        C.write_json(json_path, result)
        return out

    # Each phase gets its arguments bound by partial, not read by a closure: parts, source, index and report are
    # deleted below to unmap the shards, and no closure should refer to those names once they are gone.
    parts = phase("generate", partial(ann_data.load_contiguous, n, d, args.seed, log))
    source = VectorSource(parts)
    log(
        f"data: {n:,} x {d} float16 in {len(parts)} memory-mapped file(s), "
        f"{sum(p.nbytes for p in parts) / (1 << 30):.1f} GiB"
    )
    choice = choose_index(n, d, budget, args.target)
    spec = choice.spec
    result["choice"] = choice.to_json()
    log(f"auto at {args.max_memory}: {spec.factory} — {choice.reason}")
    index = phase("build", partial(build_vector_index, source, spec))
    path = work / "index.faiss"
    phase("write", partial(faiss.write_index, index, str(path)))
    result["index_file_bytes"] = path.stat().st_size
    tune_q = ann_data.queries(TUNE_QUERIES, d, args.seed, 0)
    report = phase("tune", partial(measure_and_tune, index, spec, source, tune_q, "held-out queries", args.target))
    result["tuning"] = report.to_json()
    log(f"tuned: {report.knobs.to_json()} recall@10 {report.recall_at_10:.4f} on the tuning queries")
    eval_q = ann_data.queries(args.queries, d, args.seed, EVAL_OFFSET)
    truth = phase("ground_truth", partial(ann_data.truth, parts, eval_q, f"eval{EVAL_OFFSET}", args.seed, K, log))
    ours = phase(
        "search", partial(evaluate, index, spec, report.knobs, source, eval_q, truth, args.single, args.rounds)
    )
    result["search"] = ours
    log(
        f"search: recall@10 {ours['recall@10']:.4f}, b1 {ours['b1_latency_ms']:.2f} ms, "
        f"batch {ours['batch_qps']:,.0f} QPS"
    )
    del index
    C.trim()

    result["ru_maxrss_bytes"] = C.peak_rss_bytes()
    del parts, source, report  # unmap the shards: their pages can only leave the page cache once nothing maps them
    C.trim()
    run_search_processes(result, args, path, budget)
    C.write_json(json_path, result)
    report_tables(result, budget)
    C.write_json(json_path, result)
    log(f"wrote {json_path}")


def run_search_processes(result: dict[str, Any], args: argparse.Namespace, path: Path, budget: int) -> None:
    """Fresh search processes under a memory cgroup of the budget, shards and index dropped from the page cache first.

    What a search process holds is the index (memory-mapped IVF lists) plus the float16 rows it re-ranks, read
    from disk: with 10 GB of rows and a 4 GB limit, most re-ranked rows are not in (this cgroup's) page cache.
    Its peak RSS (VmHWM) counts resident file pages too (page cache mapped into it, up to the limit), so the
    cgroup's verdict (no OOM kill under the limit) and peak RssAnon are what show the budget is kept.
    """
    spec_arg = json.dumps({"spec": result["choice"]["spec"], "knobs": result["tuning"]["knobs"]})
    base = [
        sys.executable,
        __file__,
        "--child",
        str(path),
        "--child-spec",
        spec_arg,
        "--n",
        str(args.n),
        "--d",
        str(args.d),
        "--seed",
        str(args.seed),
        "--queries",
        str(args.queries),
        "--single",
        str(args.single),
        "--rounds",
        "1",
        "--time-budget",
        str(SEARCH_PROCESS_PHASE_SECONDS),
    ]
    shards = [ann_data.contiguous_path(args.n, args.d, args.seed)]
    runs = {}
    for name, extra in (("default", []), ("MADV_RANDOM", ["--madv-random"])):
        for file in [path, *shards]:
            C.drop_from_page_cache(file)
        try:
            C.MemoryCgroup(budget, "probe")  # only locates one
            limit = budget
        except RuntimeError as error:
            log(f"no memory cgroup ({error}); the search process runs without a limit")
            limit = None
        log(
            f"search process ({name} memory maps): read_vector_index(mmap=True) under a "
            f"{'%.2f GiB' % (limit / (1 << 30)) if limit else 'no'} memory limit, page cache dropped"
        )
        run = C.run_limited(limit, base + extra, f"ann_10m_{os.getpid()}_{name}")
        sp = run.pop("child_result", None)
        if sp is None:
            log(f"search process failed ({run['returncode']} {run.get('signal', '')}): {run['stderr_tail'][-1500:]}")
            runs[name] = {"error": run}
            continue
        head = result["search"].get("found_head")
        found = sp.pop("found_head")
        if head:
            sp["same_results_as_build_process"] = float(np.mean(np.array(found) == np.array(head)))
        sp["limit_bytes"], sp["cgroup"], sp["wall_s"] = limit, run["cgroup"], run["wall_s"]
        runs[name] = sp
        log(
            f"  -> recall@10 {sp['recall@10']:.4f}, b1 {sp['b1_latency_ms']:.2f} ms "
            f"(first pass {sp['b1_latency_ms_first_pass']:.2f}), batch {sp['batch_qps']:,.0f} QPS, "
            f"RssAnon peak {sp['peak']['anon'] / (1 << 20):,.0f} MB, cgroup {run['cgroup']}"
        )
    result["search_processes"] = runs


def report_tables(result: dict[str, Any], budget: int) -> None:
    f, GB = C.fmt, 1 << 30
    a = result["args"]
    print(f"\n## {int(a['n']):,} x {a['d']}, budget {a['max_memory']}, target recall@10 >= {a['target']}\n")
    print(f"auto: {result['choice']['spec']['factory']} — {result['choice']['reason']}\n")
    rows = [
        [
            name,
            f(p["wall_s"], 0),
            f(p["cpu_s"], 0),
            f(p["peak_rss_anon_bytes"] / GB, 2),
            f(p["peak_rss_file_bytes"] / GB, 2),
            f(p["peak_vmrss_bytes"] / GB, 2),
        ]
        for name, p in result["phases"].items()
    ]
    print(
        C.table(
            ["phase", "wall s", "CPU s", "peak RssAnon GiB", "peak RssFile GiB (mmap'd shards)", "peak RSS GiB"], rows
        )
    )
    s, t = result["search"], result["tuning"]
    print()
    print(
        C.table(
            ["", "value"],
            [
                ["estimated index bytes", f"{result['choice']['estimated_bytes'] / GB:.2f} GiB"],
                ["index file", f"{result['index_file_bytes'] / GB:.2f} GiB"],
                ["tuned knobs", json.dumps(t["knobs"])],
                [f"recall@10 ({t['queries']} tuning queries)", f(t["recall@10"], 4)],
                [f"recall@10 ({s['batch']} held-out queries)", f(s["recall@10"], 4)],
                ["batch-1 latency median", f"{s['b1_latency_ms']:.2f} ms ({s['b1_qps']:,.0f} QPS)"],
                [f"batch-{s['batch']} QPS", f(s["batch_qps"], 0)],
                [
                    "peak RSS of the build process (getrusage)",
                    f"{result['ru_maxrss_bytes'] / GB:.2f} GiB (includes resident pages of the mmap'd shards)",
                ],
                [
                    "peak RssAnon of the build process",
                    f"{max(p['peak_rss_anon_bytes'] for p in result['phases'].values()) / GB:.2f} GiB",
                ],
            ],
        )
    )
    sp_rows = []
    for name, sp in result.get("search_processes", {}).items():
        if "error" in sp:
            sp_rows.append([name, "FAILED", "", "", "", "", "", "", ""])
            continue
        cg = sp.get("cgroup") or {}
        sp_rows.append(
            [
                name,
                f"{sp['limit_bytes'] / GB:.2f} GiB" if sp.get("limit_bytes") else "none",
                f(sp["recall@10"], 4),
                f"{sp.get('same_results_as_build_process', float('nan')):.1%}",
                f"{sp['b1_latency_ms_first_pass']:.2f} / {sp['b1_latency_ms']:.2f} "
                f"({sp['b1_samples_first_pass']} / {sp['b1_samples']})",
                f"{sp['batch_qps']:,.0f} ({sp['recall_queries']} answered)",
                f(sp["peak"]["anon"] / GB, 2),
                f(sp["vm_hwm"] / GB, 2),
                f"{cg.get('peak_bytes', 0) / GB:.2f} / {cg.get('oom_kill', '-')}",
            ]
        )
    if sp_rows:
        print(
            f"\nFresh search processes (read_vector_index(mmap=True), re-ranking from the memory-mapped float16 file), "
            f"index and shards dropped from the page cache before each; each phase stopped after "
            f"{SEARCH_PROCESS_PHASE_SECONDS} s\n"
        )
        print(
            C.table(
                [
                    "memory maps",
                    "memory limit (cgroup)",
                    "recall@10",
                    "same as build process",
                    "b1 ms first pass / warm (queries)",
                    "QPS, batches of 100",
                    "peak RssAnon GiB",
                    "VmHWM GiB (incl. page cache)",
                    "cgroup peak GiB / OOM kills",
                ],
                sp_rows,
            )
        )
    verdicts = []
    ok_recall = s["recall@10"] >= float(a["target"])
    verdicts.append(
        f"recall@10 {s['recall@10']:.4f} {'>=' if ok_recall else '<'} {a['target']}: {'MET' if ok_recall else 'MISSED'}"
    )
    sps = [sp for sp in result.get("search_processes", {}).values() if "error" not in sp]
    limited = [sp for sp in sps if sp.get("limit_bytes") and sp["cgroup"].get("oom_kill", 1) == 0]
    ok_mem = (
        result["index_file_bytes"] <= budget
        and bool(limited)
        and len(limited) == len(result.get("search_processes", {}))
    )
    verdicts.append(
        f"index file {result['index_file_bytes'] / GB:.2f} GiB; search processes ran under a {budget / GB:.2f} GiB "
        "memory cgroup without an OOM kill "
        f"(peak RssAnon {max([sp['peak']['anon'] for sp in sps] or [0]) / GB:.2f} GiB): "
        f"{'MET' if ok_mem else 'MISSED (see the table)'}"
    )
    build_anon = max(p["peak_rss_anon_bytes"] for k, p in result["phases"].items() if k in ("build", "tune"))
    verdicts.append(
        f"build + tuning peak RssAnon {build_anon / GB:.2f} GiB (the index being built, training sample, "
        f"exact-search blocks) vs budget {budget / GB:.2f} GiB: {'within' if build_anon <= budget else 'over'}"
    )
    result["verdicts"] = verdicts
    print("\n## Targets\n")
    for line in verdicts:
        print(f"- {line}")


if __name__ == "__main__":
    main()
