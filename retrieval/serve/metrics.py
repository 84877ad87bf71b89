"""Prometheus metrics of one app (its own registry, no process-wide state): requests, latencies, errors."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters and histograms labelled by route template (``/api/v1/items/{kind}/{item_id}``), never the raw path."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "retrieval_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.errors = Counter(
            "retrieval_http_errors",
            "HTTP requests answered with a 4xx or 5xx status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "retrieval_http_request_seconds",
            "Time to answer a request",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.switches = Gauge(
            "retrieval_index_switches", "Builds switched to while serving", ["index"], registry=self.registry
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, str(status)).inc()

    def render(self, switches: dict[str, int]) -> bytes:
        for name, count in switches.items():
            self.switches.labels(name).set(count)
        return generate_latest(self.registry)
