"""QPS and p50/p99 latency of vector searches over HTTP (``retrieval serve``) beside the same searches in-process.

One run: a 100,000-image CLIP index (synthetic clustered vectors, tests/large_index.py; or --index DIR),
a ``retrieval serve`` subprocess on 127.0.0.1, and for each client count (1, 8, 32 threads) the same
query vectors, k=10, for --seconds each:

* ``api``: ``Index.search_vectors("image", q, "image", 10)`` in this process, one call per query, one
  OpenMP thread per search (as the server runs vector queries, ``--search-threads 1``);
* ``http``: ``POST /api/v1/search {"queries": [{"vector": q}], "k": 10}`` on a keep-alive connection per
  thread (stdlib ``http.client``, the lightest client), every answer checked (200, 10 hits).

``server_ms`` is the median ``took_ms`` the server reports (its handler: parse, search, hit records),
so the rest of an HTTP latency is the ASGI stack, the socket and the client. Then the issue's targets:
HTTP overhead at 1 client (p50 http - p50 api) <= 2 ms, and QPS at 32 clients >= 80% of the api's.

    python benchmarks/serve_load.py [--seconds 10] [--clients 1,8,32] [--index DIR] [--json OUT] [--query text]

``--query text`` sends captions instead (``{"text": ...}`` over HTTP, ``Index.text_to_image`` in-process):
the request a search box makes, where encoding the text is part of the work on both sides.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
K = 10
QUERIES = 512
OVERHEAD_TARGET_MS = 2.0
THROUGHPUT_TARGET = 0.8


@dataclass
class Run:
    """Latencies (seconds) of one setting, and what went wrong."""

    latencies: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cpu_here: float = 0.0  # CPU seconds of this process (clients, or the in-process searches) during the run
    cpu_server: float | None = None  # CPU seconds of the server process during the run

    def row(self, how: str, clients: int) -> dict:
        lat = np.asarray(self.latencies) * 1000
        return {
            "how": how,
            "clients": clients,
            "requests": len(lat),
            "errors": len(self.errors),
            "qps": round(len(lat) / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) else None,
            "server_ms": round(float(np.median(self.server_ms)), 3) if self.server_ms else None,
            "cpu_ms_here": round(1000 * self.cpu_here / max(len(lat), 1), 3),
            "cpu_ms_server": round(1000 * self.cpu_server / max(len(lat), 1), 3)
            if self.cpu_server is not None
            else None,
        }


def query_vectors(index, count: int = QUERIES, seed: int = 7) -> np.ndarray:
    """Stored image vectors with noise added, unit length: realistic near-duplicate queries."""
    source = index.vector_source(f"{index.manifest['spaces']['image']}/image")
    rng = np.random.default_rng(seed)
    picked = np.asarray(source.take(rng.choice(len(source), count, replace=False)), np.float32)
    noisy = picked + 0.1 * rng.standard_normal(picked.shape).astype(np.float32) / np.sqrt(picked.shape[1])
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def process_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) used so far by process ``pid`` (None: not on Linux, or no such process)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def hammer(clients: int, seconds: float, work, server_pid: int | None = None, setup=None) -> Run:
    """Run ``work(thread, number) -> (latency_s, server_ms or None, error or None)`` on ``clients`` threads for
    ``seconds`` (``setup()`` first on each)."""
    run = Run()
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(thread: int) -> None:
        mine: list[tuple] = []
        if setup is not None:
            setup()
        start.wait()
        number = thread
        while time.perf_counter() < deadline[0]:
            mine.append(work(thread, number))
            number += clients
        with lock:
            for latency, server, problem in mine:
                run.latencies.append(latency)
                if server is not None:
                    run.server_ms.append(server)
                if problem:
                    run.errors.append(problem)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    cpu_here, cpu_server = time.process_time(), process_cpu(server_pid)
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    run.seconds = time.perf_counter() - began
    run.cpu_here = time.process_time() - cpu_here
    server_after = process_cpu(server_pid)
    run.cpu_server = server_after - cpu_server if cpu_server is not None and server_after is not None else None
    return run


def one_search_thread() -> None:
    """As the server's workers do for vector queries (``--search-threads 1``): one OpenMP thread per search."""
    import faiss

    faiss.omp_set_num_threads(1)


def query_texts(count: int = QUERIES) -> list[str]:
    """Distinct short captions, as a search box sends them."""
    things = [
        "dog",
        "cat",
        "horse",
        "car",
        "plate of food",
        "beach",
        "city street",
        "train",
        "bird",
        "boat",
        "kitchen",
        "bicycle",
    ]
    places = [
        "in the snow",
        "at night",
        "on a table",
        "near the water",
        "in a park",
        "under a bridge",
        "indoors",
        "on a road",
    ]
    return [f"a {things[i % len(things)]} {places[(i // len(things)) % len(places)]} ({i})" for i in range(count)]


def api_work(index, queries: np.ndarray | list[str]):
    def work(thread: int, number: int):
        q = queries[number % len(queries)]
        started = time.perf_counter()
        if isinstance(q, str):
            found = len(index.text_to_image(q, k=K))
        else:
            _, positions = index.search_vectors("image", q[None, :], "image", K)
            found = int((positions[0] >= 0).sum())
        latency = time.perf_counter() - started
        return latency, None, None if found == K else "fewer than k hits"

    return work


def http_work(port: int, queries: np.ndarray | list[str], clients: int):
    bodies = [
        json.dumps({"queries": [{"text": q} if isinstance(q, str) else {"vector": q.tolist()}], "k": K}).encode()
        for q in queries
    ]
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(clients)]
    headers = {"content-type": "application/json"}

    def work(thread: int, number: int):
        connection = connections[thread]
        started = time.perf_counter()
        try:
            connection.request("POST", "/api/v1/search", bodies[number % len(bodies)], headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            connection.close()
            return time.perf_counter() - started, None, f"{type(e).__name__}: {e}"
        latency = time.perf_counter() - started
        if response.status != 200:
            return latency, None, f"HTTP {response.status}: {data[:200]!r}"
        body = json.loads(data)
        problem = None if len(body["results"][0]["hits"]) == K else "fewer than k hits"
        return latency, body["took_ms"], problem

    return work, connections


def measure(index_path: Path, clients_list: list[int], seconds: float, query: str = "vector") -> list[dict]:
    from serve_helpers import serve_process

    from retrieval import open_index
    from retrieval.serve.served import warm

    index = open_index(index_path, device="cpu")
    warm(index)
    queries = query_vectors(index) if query == "vector" else query_texts()
    gc.freeze()  # as `retrieval serve` does: no full collection walks the loaded index (a ~0.25 s stall each)
    rows = []
    print(HEADER)
    with serve_process("--index", f"big={index_path}") as (url, process):
        port = int(url.rsplit(":", 1)[1])
        setup = one_search_thread if query == "vector" else None  # the server limits threads for vector queries only
        for clients in clients_list:
            hammer(clients, min(1.0, seconds), api_work(index, queries), setup=setup)  # warm-up, not counted
            rows.append(hammer(clients, seconds, api_work(index, queries), setup=setup).row("api", clients))
            work, connections = http_work(port, queries, clients)
            hammer(clients, min(1.0, seconds), work)
            rows.append(hammer(clients, seconds, work, process.pid).row("http", clients))
            for connection in connections:
                connection.close()
            print_rows(rows[-2:])
    return rows


HEADER = (
    "| how | clients | QPS | p50 ms | p99 ms | requests | errors | server handler ms (p50) "
    "| CPU ms/request here | CPU ms/request server |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def print_rows(rows: list[dict]) -> None:
    """Rows of a Markdown table (see ``HEADER``)."""

    def cell(value) -> str:
        return "" if value is None else str(value)

    for r in rows:
        print(
            f"| {r['how']} | {r['clients']} | {r['qps']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} "
            f"| {r['requests']} | {r['errors']} | "
            f"{cell(r['server_ms'])} | {cell(r['cpu_ms_here'])} | {cell(r['cpu_ms_server'])} |",
            flush=True,
        )


def targets(rows: list[dict]) -> dict:
    by = {(r["how"], r["clients"]): r for r in rows}
    out = {}
    if ("http", 1) in by:
        overhead = by[("http", 1)]["p50_ms"] - by[("api", 1)]["p50_ms"]
        out["overhead_ms_at_1"] = round(overhead, 3)
        out["overhead_met"] = overhead <= OVERHEAD_TARGET_MS
    top = max(c for how, c in by if how == "http")
    ratio = by[("http", top)]["qps"] / by[("api", top)]["qps"]
    out.update({f"qps_ratio_at_{top}": round(ratio, 3), "throughput_met": ratio >= THROUGHPUT_TARGET})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per setting (plus 1 s warm-up)")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument(
        "--index", type=Path, help="an existing index (default: a 100,000-image one made in a temporary folder)"
    )
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument(
        "--index-type", default="ivf", help="of the made index: ivf (IVF-Flat, tuned nprobe), flat (exact), auto, ..."
    )
    parser.add_argument("--json", type=Path, help="also write the rows and targets here")
    parser.add_argument(
        "--query",
        choices=["vector", "text"],
        default="vector",
        help="vector: raw vectors (the search alone); text: captions, encoded by the tiny CLIP model then searched",
    )
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    print(
        f"machine: {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        os.environ.setdefault("RETRIEVAL_CACHE_DIR", str(Path(tmp) / "cache"))
        path = args.index
        if path is None:
            from large_index import make_large_index
            from tiny_clip import make_tiny_clip

            started = time.perf_counter()
            path = make_large_index(
                Path(tmp) / "big", make_tiny_clip(Path(tmp) / "tiny-clip"), args.images, index_type=args.index_type
            )
            print(f"index: {args.images} images ({args.index_type}) written in {time.perf_counter() - started:.1f} s")
        rows = measure(path, clients, args.seconds, args.query)
    result = targets(rows)
    print(json.dumps(result))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "targets": result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
