"""ANN index layer at 1M vectors: our build/tune/search against raw FAISS, numpy brute force and autofaiss.

Data: ``benchmarks/ann_data.py`` (synthetic CLIP-like embeddings: hierarchical clusters of Zipf sizes,
power-law spectra, a shared "cone" direction; L2-normalised; held-out queries from the same model; top-1
cosine ~0.8-0.95), cached as float16 shards under ``index_data/bench/``. Inner product throughout.

For each index type (flat, hnsw, ivf, ivfsq, ivfpq, and ``auto`` = ``choose_index(n, d, --max-memory, 0.95)``):

- ours: ``build_vector_index(VectorSource(float16 shards, memory-mapped), spec)``, then
  ``measure_and_tune(..., target_recall=0.95)`` on ``RECALL_QUERIES`` (the library's count) tuning queries;
  search with ``search()`` and the tuned knobs (ivfpq: ``rerank_with=`` the memory-mapped float16 shard, which
  FAISS re-ranks from in place);
- raw FAISS with the same parameters: ``faiss.index_factory`` + the build settings the library applies
  (k-means iterations, efConstruction, ...), trained on the very same sample rows, one ``add`` of the float32
  matrix; search with ``nprobe`` / ``hnsw.efSearch`` set on the index and plain ``index.search`` (ivfpq:
  ``faiss.IndexRefine`` over a float16 ``IndexScalarQuantizer`` holding a copy of the rows in RAM, ``k_factor`` =
  our rerank factor: FAISS's own exact re-ranking). Raw build time counts the conversion of the float16 shards
  to the float32 matrix it adds (our build converts them chunk by chunk), shown separately too;
- measured: build seconds (wall and process CPU), estimated / serialized / RSS-delta memory, tuned knobs,
  latency at batch 1 (median over ``--single`` queries x ``--rounds``, ours and raw interleaved), QPS at
  batch ``--batch`` (median of ``--rounds``), recall@10 of ``--queries`` evaluation queries (disjoint from the
  tuning queries) against exact search.

Baselines in the same run: numpy brute force (matmul + argpartition over the float32 matrix) and autofaiss
(its own venv, ``index_data/bench/autofaiss-venv``, created when missing: autofaiss pins numpy<2) building
at the same ``--max-memory``; its index is loaded here and searched with the ``index_param`` it chose, and
also with knobs tuned by our ``measure_and_tune`` to the same 0.95 target (equal-recall comparison).

    python benchmarks/ann_bench.py                      # 1M x 512, all types, autofaiss (~1 h on 2 cores)
    python benchmarks/ann_bench.py --n 100000 --skip-autofaiss --types ivf,ivfpq,auto   # ~1-2 min
"""

from __future__ import annotations

import os

# FAISS's OpenMP threads spin while they wait by default; on a 2-core machine shared with anything else (tests,
# another build) that turns into 5x slower k-means/OPQ training (measured: OPQ64 training 132 s vs 25 s).
# PASSIVE makes them sleep instead; it changed no single-query latency measurably here. Set before faiss loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import ann_common as C
import ann_data
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.index.recall import (
    EF_SEARCH_STEPS,
    NPROBE_STEPS,
    RECALL_QUERIES,
    measure_and_tune,
    recall_at,
)
from retrieval.index.source import VectorSource
from retrieval.index.spec import (
    DEFAULT_RERANK_FACTOR,
    IndexSpec,
    SearchKnobs,
    choose_index,
    estimate_bytes,
    parse_memory,
    spec_for,
)
from retrieval.index.vector_index import apply_build_params, build_vector_index, search

ROOT = Path(__file__).resolve().parents[1]
K = 10
TARGET = 0.95
TUNE_QUERIES = RECALL_QUERIES  # what a build tunes with (rows 0.. of the query stream)
EVAL_OFFSET = 1000  # evaluation queries start here in the query stream, after the tuning queries
AUTOFAISS_VENV = ann_data.CACHE / "autofaiss-venv"
AUTOFAISS_PACKAGES = ["autofaiss==2.18.0", "pyarrow<21"]  # pyarrow 21+ needs numpy 2, autofaiss pins numpy<2
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.0f} s] {message}", file=sys.stderr, flush=True)


# -- raw FAISS with the library's parameters ---------------------------------------------------------------


def raw_build(xb: np.ndarray, spec: IndexSpec, seed: int = 0) -> Any:
    """What a FAISS user writes by hand for ``spec``: index_factory, the same build settings, train on the same
    rows, add."""
    import faiss

    n, d = xb.shape
    index = faiss.index_factory(d, spec.factory, faiss.METRIC_INNER_PRODUCT)
    apply_build_params(index, spec)  # the very settings the library applies, so only the wrapper differs
    if not index.is_trained:
        size = spec.train_size or n
        # the very rows VectorSource.sample(size, seed) picks
        rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)) if size < n else slice(None)
        index.train(xb[rows])
    index.add(xb)
    return index


def raw_searcher(index: Any, spec: IndexSpec, knobs: SearchKnobs, xb: np.ndarray) -> Any:
    """The raw index with the tuned knobs set on it (ivfpq: wrapped in FAISS's re-ranking from float16 rows in RAM)."""
    import faiss

    if spec.nlist and knobs.nprobe:
        faiss.extract_index_ivf(index).nprobe = knobs.nprobe
    if spec.type == "hnsw" and knobs.ef_search:
        index.hnsw.efSearch = knobs.ef_search
    if spec.rerank:
        rows = faiss.IndexScalarQuantizer(xb.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        rows.add(xb)
        refined = faiss.IndexRefine(index, rows)
        refined.k_factor = float(knobs.rerank_factor or DEFAULT_RERANK_FACTOR)
        _keep_alive.append(rows)  # IndexRefine does not own its parts; the caller keeps ``index`` alive
        return refined
    return index


_keep_alive: list[Any] = []


def index_file_bytes(index: Any, scratch: Path) -> int:
    import faiss

    scratch.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(scratch))
    size = scratch.stat().st_size
    scratch.unlink()
    return size


# -- numpy brute force ---------------------------------------------------------------------------------------


def numpy_search(xb: np.ndarray, q: np.ndarray, k: int = K, block: int = 65_536) -> np.ndarray:
    """Exact top-k by matmul + argpartition, in row blocks (a (1000 x n) score matrix would not fit)."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for start in range(0, len(xb), block):
        s = q @ xb[start : start + block].T
        top = np.argpartition(s, s.shape[1] - k, axis=1)[:, -k:]
        best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        best_i = np.concatenate([best_i, top + start], 1)
        if best_s.shape[1] > 4 * k:
            keep = np.argpartition(best_s, best_s.shape[1] - k, axis=1)[:, -k:]
            best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)[:, :k]


def numpy_single(xb: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    s = xb @ q[0]
    top = np.argpartition(s, len(s) - k)[-k:]
    return top[np.argsort(-s[top])][None, :]


# -- measuring searchers side by side ------------------------------------------------------------------------


def compare_search(
    fns: dict[str, Callable[[np.ndarray], np.ndarray]], singles: np.ndarray, batch: np.ndarray, rounds: int
) -> dict[str, dict[str, Any]]:
    """Batch-1 latencies (searchers taking turns query by query) and batch throughput (order alternating
    round by round) of each searcher."""
    names = list(fns)
    out = {name: {"single_s": [], "batch_s": [], "found": None} for name in names}
    for number in range(rounds):
        order = names if number % 2 == 0 else names[::-1]
        for name, times in C.interleaved_latencies(fns, singles, flip=number % 2 == 1).items():
            out[name]["single_s"] += times
        for name in order:
            started = time.perf_counter()
            found = fns[name](batch)
            out[name]["batch_s"].append(time.perf_counter() - started)
            if out[name]["found"] is None:
                out[name]["found"] = found
    for name in names:
        row = out[name]
        latency = C.median(row["single_s"])
        row["b1_latency_ms"] = latency * 1000
        row["b1_qps"] = 1 / latency
        row["b1_samples"] = len(row["single_s"])
        row["batch_qps"] = len(batch) / C.median(row["batch_s"])
        del row["single_s"]
    return out


def positions_of(result: Any) -> np.ndarray:
    return result[1] if isinstance(result, tuple) else result


def operating_points(
    index: Any, spec: IndexSpec, knobs: SearchKnobs, source: VectorSource, queries: np.ndarray, truth: np.ndarray
) -> list[dict[str, Any]]:
    """Recall@10 and batch QPS on the evaluation queries around the tuned knobs (and, for re-ranking, longer
    shortlists)."""
    points = []
    if spec.nlist:
        steps = [p for p in NPROBE_STEPS if p <= spec.nlist]
        at = steps.index(knobs.nprobe) if knobs.nprobe in steps else 0
        nprobes = steps[max(0, at - 1) : at + 3]
        if spec.rerank:
            nprobes = sorted(set(nprobes[:2]) | {8, 16, 32, 64})
            grid = [SearchKnobs(nprobe=p, rerank_factor=f) for f in (10, 20, 50) for p in nprobes if p <= spec.nlist]
        else:
            grid = [SearchKnobs(nprobe=p) for p in nprobes]
    elif spec.hnsw_m:
        at = EF_SEARCH_STEPS.index(knobs.ef_search) if knobs.ef_search in EF_SEARCH_STEPS else 0
        grid = [SearchKnobs(ef_search=e) for e in EF_SEARCH_STEPS[max(0, at - 1) : at + 3]]
    else:
        return points
    rerank_with = source if spec.rerank else None
    for candidate in grid:
        started = time.perf_counter()
        found = search(index, queries, K, candidate, rerank_with=rerank_with)[1]
        seconds = time.perf_counter() - started
        points.append(
            {**candidate.to_json(), "recall@10": recall_at(found, truth, K), "batch_qps": len(queries) / seconds}
        )
    return points


# -- autofaiss -----------------------------------------------------------------------------------------------


def autofaiss_python() -> Path:
    python = AUTOFAISS_VENV / "bin" / "python"
    if python.exists():
        return python
    log(f"creating {AUTOFAISS_VENV} (autofaiss pins numpy<2, so it gets its own venv)")
    base = shutil.which("python3") or sys.executable
    subprocess.run([base, "-m", "venv", str(AUTOFAISS_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *AUTOFAISS_PACKAGES], check=True)
    return python


def autofaiss_inputs(parts: list[np.ndarray], n: int, d: int, seed: int) -> Path:
    """A folder holding exactly the n rows as .npy files (hard links to whole shards, a copy of a partial one)."""
    folder = ann_data.CACHE / f"autofaiss_in_{ann_data.data_dir(d, seed).name}_n{n}"
    if folder.exists() and sum(np.load(p, mmap_mode="r").shape[0] for p in folder.glob("*.npy")) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    paths = ann_data.ensure_shards(n, d, seed, log)
    for path, part in zip(paths, parts, strict=True):
        target = folder / path.name
        if np.load(path, mmap_mode="r").shape[0] == len(part):
            try:
                os.link(path, target)
                continue
            except OSError:
                pass
        np.save(target, np.asarray(part))
    return folder


AUTOFAISS_SCRIPT = """
import json, sys, time
from autofaiss import build_index
args = json.loads(sys.argv[1])
started = time.perf_counter()
build_index(**args)
print("AUTOFAISS_SECONDS", time.perf_counter() - started)
"""


def run_autofaiss(
    parts: list[np.ndarray], n: int, d: int, seed: int, max_memory: str, available: str
) -> dict[str, Any]:
    python = autofaiss_python()
    inputs = autofaiss_inputs(parts, n, d, seed)
    out = ann_data.CACHE / f"autofaiss_out_n{n}_d{d}_{max_memory}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = {
        "embeddings": str(inputs),
        "index_path": str(out / "knn.index"),
        "index_infos_path": str(out / "infos.json"),
        "max_index_memory_usage": max_memory,
        "current_memory_available": available,
        "metric_type": "ip",
    }
    log(f"autofaiss build_index({json.dumps(args)})")
    started = time.perf_counter()
    done = subprocess.run([str(python), "-c", AUTOFAISS_SCRIPT, json.dumps(args)], capture_output=True, text=True)
    wall = time.perf_counter() - started
    (out / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"autofaiss failed ({done.returncode}); see {out / 'log.txt'}:\n{done.stderr[-2000:]}")
    infos = json.loads((out / "infos.json").read_text())
    inner = [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("AUTOFAISS_SECONDS")]
    return {
        "args": args,
        "infos": infos,
        "wall_s": wall,
        "build_index_s": inner[0] if inner else None,
        "index_path": str(out / "knn.index"),
    }


def spec_of_factory(key: str, n: int) -> IndexSpec | None:
    """An IndexSpec describing an autofaiss index key, so our tuner can sweep its knobs."""
    import re

    ivf = re.search(r"IVF(\d+)", key)
    hnsw = re.match(r"HNSW(\d+)", key)
    pq = re.search(r",PQ(\d+)", key)
    if ivf:
        return IndexSpec("ivfpq" if pq else "ivf", key, nlist=int(ivf.group(1)), pq_m=int(pq.group(1)) if pq else None)
    if hnsw:
        return IndexSpec("hnsw", key, hnsw_m=int(hnsw.group(1)))
    return None


# -- main ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-memory", default="4GB", help="budget for auto and autofaiss (default 4GB)")
    parser.add_argument("--types", default="flat,hnsw,ivf,ivfsq,ivfpq,auto")
    parser.add_argument("--queries", type=int, default=1000, help="evaluation queries = the batch size (default 1000)")
    parser.add_argument("--single", type=int, default=200, help="batch-1 queries per round (exact searchers: half)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-autofaiss", action="store_true")
    parser.add_argument("--skip-raw", action="store_true", help="no raw FAISS side-by-side")
    parser.add_argument("--skip-numpy", action="store_true")
    parser.add_argument(
        "--autofaiss-available-memory",
        default="16G",
        help="autofaiss current_memory_available (RAM it may use while building)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="result file (default benchmarks/results/ann_bench_n{n}_d{d}.json)"
    )
    parser.add_argument(
        "--report-only", type=Path, default=None, help="print the tables of an earlier result file and exit"
    )
    args = parser.parse_args()
    if args.report_only:
        result = json.loads(args.report_only.read_text())
        exact_qps = {
            name: {"b1": row["b1_qps"], "batch": row["batch_qps"]}
            for name, row in (("flat", result["types"].get("flat")), ("numpy", result.get("numpy")))
            if row
        }
        return report_tables(result, exact_qps)
    import faiss

    n, d = args.n, args.d
    budget = parse_memory(args.max_memory)
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    json_path = args.json or ROOT / "benchmarks" / "results" / f"ann_bench_n{n}_d{d}.json"
    result: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": C.machine(),
        "k": K,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "tune_queries": TUNE_QUERIES,
        "library_sha1": C.library_fingerprint(ROOT),
        "target_recall": TARGET,
        "types": {},
    }
    log(f"machine: {result['machine']}")

    parts = ann_data.load(n, d, args.seed, log)
    source = VectorSource(parts)
    tune_q = ann_data.queries(TUNE_QUERIES, d, args.seed, 0)
    eval_q = ann_data.queries(args.queries, d, args.seed, EVAL_OFFSET)
    truth = ann_data.truth(parts, eval_q, f"eval{EVAL_OFFSET}", args.seed, K, log)
    singles = eval_q[: args.single]
    for path in ann_data.ensure_shards(
        n, d, args.seed, log
    ):  # page cache warm for every build: time conversion, not disk
        with open(path, "rb") as file:
            while file.read(64 << 20):
                pass
    convert_s = time.perf_counter()
    xb = np.empty((n, d), np.float32)
    for part, start in zip(parts, source.offsets[:-1], strict=True):  # offsets end with the row count
        xb[start : start + len(part)] = part
    convert_s = time.perf_counter() - convert_s
    result["convert_float16_to_float32_s"] = convert_s
    log(f"float16 shards -> float32 matrix for raw FAISS / numpy: {convert_s:.1f} s")
    log(
        f"data: {n:,} x {d} float16 shards ({sum(p.nbytes for p in parts) / C.MB:,.0f} MB) "
        "+ float32 copy for raw FAISS / numpy"
    )

    exact_qps: dict[str, dict[str, float]] = {}
    if not args.skip_numpy:
        log("numpy brute force")
        numpy = compare_search(
            {"numpy": lambda q: numpy_single(xb, q) if len(q) == 1 else numpy_search(xb, q)},
            singles[: max(100, args.single // 2)],
            eval_q,
            1,
        )["numpy"]
        numpy["recall@10"] = recall_at(numpy.pop("found"), truth, K)
        result["numpy"] = numpy
        exact_qps["numpy"] = {"b1": numpy["b1_qps"], "batch": numpy["batch_qps"]}
        log(
            f"numpy: b1 {numpy['b1_latency_ms']:.1f} ms, batch {numpy['batch_qps']:.0f} QPS, "
            f"recall {numpy['recall@10']:.4f}"
        )

    auto_choice = choose_index(n, d, budget, TARGET) if "auto" in types else None
    if auto_choice is not None:
        result["auto_choice"] = auto_choice.to_json()
        log(f"auto at {args.max_memory}: {auto_choice.spec.factory} — {auto_choice.reason}")
    built: dict[IndexSpec, str] = {}
    for name in types:
        spec = auto_choice.spec if name == "auto" else spec_for(name, n, d)
        if spec in built:
            row = dict(result["types"][built[spec]])
            row["same_as"] = built[spec]
            if name == "auto":
                row["estimated_bytes"] = auto_choice.estimated_bytes
            result["types"][name] = row
            log(f"{name}: same spec as {built[spec]} ({spec.factory}); its measurements are reused")
            continue
        built[spec] = name
        row: dict[str, Any] = {"spec": spec.to_json(), "estimated_bytes": estimate_bytes(spec, n, d)}
        log(f"{name}: building {spec.factory} (ours)")
        anon0, load0 = C.anon_bytes(), C.loadavg()
        wall, cpu, index = C.timed(partial(build_vector_index, source, spec))
        row.update(
            build_s=wall,
            build_cpu_s=cpu,
            rss_delta_bytes=C.anon_bytes() - anon0,
            loadavg_during_build=[load0, C.loadavg()],
        )
        row["file_bytes"] = index_file_bytes(index, ann_data.CACHE / "tmp" / "index.faiss")
        log(f"{name}: built in {wall:.1f} s; tuning to recall@10 >= {TARGET}")
        tune_wall, _, report = C.timed(
            partial(measure_and_tune, index, spec, source, tune_q, "held-out queries", TARGET)
        )
        knobs = report.knobs
        row.update(tune_s=tune_wall, knobs=knobs.to_json(), tuning=report.to_json())
        rerank_with = source if spec.rerank else None
        # the searchers run in this iteration only (compare_search below); default arguments bind this type's
        # index and knobs, with the same call overhead for ours and raw
        fns = {
            "ours": lambda q, index=index, knobs=knobs, rerank_with=rerank_with: search(
                index, q, K, knobs, rerank_with=rerank_with
            )[1]
        }
        raw = None
        if not args.skip_raw:
            log(f"{name}: building {spec.factory} (raw FAISS)")
            load0 = C.loadavg()
            rwall, rcpu, raw = C.timed(partial(raw_build, xb, spec))
            row["raw"] = {
                "build_s": rwall + convert_s,
                "build_from_float32_s": rwall,
                "convert_s": convert_s,
                "build_cpu_s": rcpu,
                "loadavg_during_build": [load0, C.loadavg()],
            }
            if spec.rerank:  # the raw index without any re-ranking, for reference
                faiss.extract_index_ivf(raw).nprobe = knobs.nprobe
                started = time.perf_counter()
                _, plain = raw.search(eval_q, K)
                row["raw"]["no_rerank"] = {
                    "recall@10": recall_at(plain, truth, K),
                    "batch_qps": len(eval_q) / (time.perf_counter() - started),
                }
            searcher = raw_searcher(raw, spec, knobs, xb)
            fns["raw"] = lambda q, searcher=searcher: searcher.search(q, K)[1]
        log(f"{name}: searching (knobs {knobs.to_json()})")
        count = args.single if not spec.exact else max(100, args.single // 2)
        measured = compare_search(fns, singles[:count], eval_q, args.rounds)
        for m in measured.values():
            m["recall@10"] = recall_at(m.pop("found"), truth, K)
        row.update({k: v for k, v in measured["ours"].items()})
        if "raw" in measured:
            row["raw"].update(measured["raw"])
            row["b1_added_latency_us"] = (measured["ours"]["b1_latency_ms"] - measured["raw"]["b1_latency_ms"]) * 1000
            row["overhead"] = {
                "build": row["build_s"] / row["raw"]["build_s"] - 1,
                "build_vs_float32_input": row["build_s"] / row["raw"]["build_from_float32_s"] - 1,
                "b1": measured["raw"]["b1_qps"] / measured["ours"]["b1_qps"] - 1,
                "batch": measured["raw"]["batch_qps"] / measured["ours"]["batch_qps"] - 1,
            }
        if spec.exact:
            exact_qps["flat"] = {"b1": row["b1_qps"], "batch": row["batch_qps"]}
        else:
            log(f"{name}: operating points around {knobs.to_json()} on the evaluation queries")
            row["operating_points"] = operating_points(index, spec, knobs, source, eval_q, truth)
        result["types"][name] = row
        log(
            f"{name}: recall@10 {row['recall@10']:.4f}, b1 {row['b1_latency_ms']:.3f} ms, "
            f"batch {row['batch_qps']:.0f} QPS"
            + (
                f"; overhead build {row['overhead']['build']:+.1%} b1 {row['overhead']['b1']:+.1%} "
                f"batch {row['overhead']['batch']:+.1%}"
                if "overhead" in row
                else ""
            )
        )
        del index, raw, fns
        C.write_json(json_path, result)

    if not args.skip_autofaiss:
        del xb
        C.trim()
        af = run_autofaiss(parts, n, d, args.seed, args.max_memory, args.autofaiss_available_memory)
        infos = af["infos"]
        log(f"autofaiss: {infos.get('index_key')} / {infos.get('index_param')} in {af['wall_s']:.0f} s")
        index = faiss.read_index(af["index_path"])
        af["file_bytes"] = os.path.getsize(af["index_path"])
        faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
        fns = {"autofaiss": lambda q: index.search(q, K)[1]}
        af_spec = spec_of_factory(infos["index_key"], n)
        if af_spec is not None:
            report = measure_and_tune(index, af_spec, source, tune_q, "held-out queries", TARGET)
            af["our_tuning"] = {"knobs": report.knobs.to_json(), "recall@10_tune": report.recall_at_10}
            fns["autofaiss_at_target"] = lambda q: search(index, q, K, report.knobs)[1]
            faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])  # search() passes its own params
        measured = compare_search(fns, singles, eval_q, args.rounds)
        for m in measured.values():
            m["recall@10"] = recall_at(m.pop("found"), truth, K)
        af.update(measured)
        result["autofaiss"] = af
        del index
        C.write_json(json_path, result)

    report_tables(result, exact_qps)
    C.write_json(json_path, result)
    log(f"wrote {json_path}")


def report_tables(result: dict[str, Any], exact_qps: dict[str, dict[str, float]]) -> None:
    f = C.fmt
    rows = []
    exact = exact_qps.get("flat") or exact_qps.get("numpy")
    exact_name = "flat" if "flat" in exact_qps else "numpy"
    for name, r in result["types"].items():
        rows.append(
            [
                name + (f" (= {r['same_as']})" if r.get("same_as") else ""),
                r["spec"]["factory"],
                f(r["build_s"]),
                f(r["tune_s"]),
                f(r["estimated_bytes"] / C.MB, 0),
                f(r["file_bytes"] / C.MB, 0),
                f(r["rss_delta_bytes"] / C.MB, 0),
                " ".join(f"{k}={v}" for k, v in r["knobs"].items()) or "-",
                f(r["recall@10"], 4),
                f(r["b1_latency_ms"], 3),
                f(r["b1_qps"], 0),
                f(r["batch_qps"], 0),
                f(r["b1_qps"] / exact["b1"], 1) if exact else "-",
                f(r["batch_qps"] / exact["batch"], 1) if exact else "-",
            ]
        )
    n = int(result["args"]["n"])
    print(
        f"\n## Ours: {n:,} x {result['args']['d']}, k={K}, knobs tuned to recall@10 >= {TARGET} "
        f"on {result.get('tune_queries', 200)} held-out queries, "
        f"recall on {result['args']['queries']} other held-out queries\n"
    )
    print(
        C.table(
            [
                "type",
                "factory",
                "build s",
                "tune s",
                "est MB",
                "file MB",
                "RSS delta MB",
                "knobs",
                "recall@10",
                "b1 ms",
                "b1 QPS",
                f"b{result['args']['queries']} QPS",
                f"b1 x {exact_name}",
                f"batch x {exact_name}",
            ],
            rows,
        )
    )
    raw_rows = []
    for name, r in result["types"].items():
        if "raw" not in r or r.get("same_as"):
            continue
        raw, o = r["raw"], r["overhead"]
        raw_rows.append(
            [
                name,
                f(r["build_s"]),
                f(raw["build_s"]),
                f(raw["convert_s"]),
                f"{o['build']:+.1%}",
                f"{o['build_vs_float32_input']:+.1%}",
                f(r["b1_qps"], 0),
                f(raw["b1_qps"], 0),
                f"{o['b1']:+.1%}",
                f(r["b1_added_latency_us"], 0),
                f(r["batch_qps"], 0),
                f(raw["batch_qps"], 0),
                f"{o['batch']:+.1%}",
                f(r["recall@10"], 4),
                f(raw["recall@10"], 4),
            ]
        )
    if raw_rows:
        print("\n## Against raw FAISS with the same parameters (overhead = raw speed / our speed - 1; target < 10%)\n")
        print(
            C.table(
                [
                    "type",
                    "build s ours",
                    "raw",
                    "of which f16->f32",
                    "overhead",
                    "vs raw w/o conversion",
                    "b1 QPS ours",
                    "raw",
                    "overhead",
                    "b1 +us",
                    "batch QPS ours",
                    "raw",
                    "overhead",
                    "recall ours",
                    "raw",
                ],
                raw_rows,
            )
        )
        print(
            "\n(raw build = converting the float16 shards to one float32 matrix + index_factory/train/add; "
            "recall of both at the same knobs, tuned on ours)"
        )
        for name, r in result["types"].items():
            if "no_rerank" in r.get("raw", {}):
                nr = r["raw"]["no_rerank"]
                print(
                    f"\n{name}: raw FAISS without re-ranking (plain index.search, same nprobe): "
                    f"recall@10 {nr['recall@10']:.4f}, batch {nr['batch_qps']:,.0f} QPS; raw with re-ranking = "
                    "faiss.IndexRefine over a float16 IndexScalarQuantizer holding a copy of the rows in RAM "
                    "(ours views the memory-mapped float16 shard)"
                )
    base_rows = []
    if "numpy" in result:
        m = result["numpy"]
        base_rows.append(
            [
                "numpy brute force (float32 matmul + argpartition)",
                "-",
                f(m["recall@10"], 4),
                f(m["b1_latency_ms"], 2),
                f(m["b1_qps"], 0),
                f(m["batch_qps"], 0),
            ]
        )
    af = result.get("autofaiss")
    if af:
        infos = af["infos"]
        base_rows.append(
            [
                f"autofaiss {infos['index_key']} ({af['args']['max_index_memory_usage']}), its params",
                infos["index_param"],
                f(af["autofaiss"]["recall@10"], 4),
                f(af["autofaiss"]["b1_latency_ms"], 3),
                f(af["autofaiss"]["b1_qps"], 0),
                f(af["autofaiss"]["batch_qps"], 0),
            ]
        )
        if "autofaiss_at_target" in af:
            t = af["autofaiss_at_target"]
            base_rows.append(
                [
                    f"autofaiss index, knobs tuned by us to {TARGET}",
                    json.dumps(af["our_tuning"]["knobs"]),
                    f(t["recall@10"], 4),
                    f(t["b1_latency_ms"], 3),
                    f(t["b1_qps"], 0),
                    f(t["batch_qps"], 0),
                ]
            )
    if base_rows:
        print("\n## Baselines\n")
        print(C.table(["baseline", "params", "recall@10", "b1 ms", "b1 QPS", "batch QPS"], base_rows))
        if af:
            print(
                f"\nautofaiss: build {af['wall_s']:.0f} s (subprocess wall), "
                f"index file {af['file_bytes'] / C.MB:,.0f} MB, "
                f"its estimate {infos.get('size in bytes', 0) / C.MB:,.0f} MB"
            )
    exact = exact_qps.get("flat") or exact_qps.get("numpy")
    for name, r in result["types"].items():
        if not r.get("operating_points") or r.get("same_as"):
            continue
        print(
            f"\n{name} ({r['spec']['factory']}): operating points on the {result['args']['queries']} "
            "evaluation queries "
            f"(tuned on the {result.get('tune_queries', 200)} tuning queries: {json.dumps(r['knobs'])})\n"
        )
        print(
            C.table(
                ["knobs", "recall@10", "batch QPS", f"x {exact_name}"],
                [
                    [
                        " ".join(f"{k}={v}" for k, v in p.items() if k not in ("recall@10", "batch_qps")),
                        f(p["recall@10"], 4),
                        f(p["batch_qps"], 0),
                        f(p["batch_qps"] / exact["batch"], 1) if exact else "-",
                    ]
                    for p in r["operating_points"]
                ],
            )
        )
    verdicts = targets(result, exact_qps)
    result["verdicts"] = verdicts
    print("\n## Targets\n")
    for line in verdicts:
        print(f"- {line}")


def targets(result: dict[str, Any], exact_qps: dict[str, dict[str, float]]) -> list[str]:
    out = []
    auto = result["types"].get("auto")
    if auto:
        ok = auto["recall@10"] >= TARGET
        out.append(
            f"auto recall@10 {auto['recall@10']:.4f} {'>=' if ok else '<'} {TARGET} on the evaluation queries at the "
            f"knobs measure_and_tune chose ({json.dumps(auto['knobs'])}, {auto['tuning']['recall@10']:.4f} "
            f"on its {result.get('tune_queries', 200)} tuning queries): {'MET' if ok else 'MISSED'}"
        )
        meeting = [p for p in auto.get("operating_points", []) if p["recall@10"] >= TARGET]
        if not ok and meeting:
            p = meeting[0]
            knobs = {k: v for k, v in p.items() if k not in ("recall@10", "batch_qps")}
            for exact_name, e in exact_qps.items():
                out.append(
                    f"auto at the smallest knobs reaching {TARGET} on the evaluation queries "
                    f"({knobs}, recall {p['recall@10']:.4f}): "
                    f"batch QPS {p['batch_qps']:,.0f} = {p['batch_qps'] / e['batch']:.1f}x exact {exact_name}"
                )
        for exact_name, e in exact_qps.items():
            for batch in ("b1", "batch"):
                ratio = auto[f"{batch}_qps"] / e[batch]
                label = "batch 1" if batch == "b1" else f"batch {result['args']['queries']}"
                out.append(
                    f"auto QPS at {label} = {ratio:.1f}x exact {exact_name} (target >= 20x): "
                    f"{'MET' if ratio >= 20 else 'MISSED'}"
                )
    for name, r in result["types"].items():
        if "overhead" in r and not r.get("same_as"):
            o = r["overhead"]
            worst = max(o["build"], o["b1"], o["batch"])
            out.append(
                f"{name} overhead vs raw FAISS: build {o['build']:+.1%}, b1 {o['b1']:+.1%}, batch {o['batch']:+.1%} "
                f"(target < 10%): {'MET' if worst < 0.10 else 'MISSED'}"
            )
            if r["raw"]["recall@10"] - r["recall@10"] > 0.005:
                out.append(
                    f"{name}: at the same knobs raw FAISS reaches recall@10 {r['raw']['recall@10']:.4f}, ours "
                    f"{r['recall@10']:.4f} (a different index, not a search overhead)"
                )
    af = result.get("autofaiss")
    if auto and af:
        a = af["autofaiss"]
        for batch in ("b1", "batch"):
            better_recall = auto["recall@10"] >= a["recall@10"]
            ratio = auto[f"{batch}_qps"] / a[f"{batch}_qps"]
            verdict = (
                "auto matches or beats its recall at equal or better QPS"
                if better_recall and ratio >= 1
                else "auto does NOT match its recall (autofaiss picks the search parameters giving the best recall "
                f"within 10 ms per query) but answers {ratio:.1f}x as many queries per second"
                if ratio >= 1
                else "auto is slower" + (" and less accurate" if not better_recall else " with at least its recall")
            )
            out.append(
                f"auto vs autofaiss ({'batch 1' if batch == 'b1' else 'batch ' + result['args']['queries']}): recall "
                f"{auto['recall@10']:.4f} vs {a['recall@10']:.4f}, "
                f"QPS {auto[f'{batch}_qps']:,.0f} vs {a[f'{batch}_qps']:,.0f}: {verdict}"
            )
        if "autofaiss_at_target" in af:
            t = af["autofaiss_at_target"]
            for batch in ("b1", "batch"):
                out.append(
                    f"at equal target ({TARGET}, both tuned by measure_and_tune), {batch}: "
                    f"auto {auto[f'{batch}_qps']:,.0f} QPS (recall {auto['recall@10']:.4f}) "
                    f"vs autofaiss's index {t[f'{batch}_qps']:,.0f} QPS (recall {t['recall@10']:.4f})"
                )
    return out


if __name__ == "__main__":
    main()
