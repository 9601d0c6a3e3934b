"""The service's Prometheus metrics, in a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds; the target is a p50 under 50 ms, so the fine buckets sit there.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class Metrics:
    """Counters and histograms that handlers update, exposed at ``/metrics``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self, running_builds: Callable[[], int], open_indexes: Callable[[], int]
    ):
        self.registry = CollectorRegistry()
        self.queries = Counter(
            "imgindex_queries",
            "Searches answered, by index (- for an unknown one) and outcome (ok "
            "or the HTTP status).",
            ["index", "outcome"],
            registry=self.registry,
        )
        self.query_seconds = Histogram(
            "imgindex_query_seconds",
            "Time to answer a search: reading the upload, decoding, embedding, "
            "searching.",
            ["index"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "imgindex_http_requests",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.builds = Counter(
            "imgindex_builds",
            "Builds started through the API, by final state (running until then).",
            ["state"],
            registry=self.registry,
        )
        running = Gauge(
            "imgindex_builds_running",
            "Builds running now.",
            registry=self.registry,
        )
        running.set_function(running_builds)
        opened = Gauge(
            "imgindex_indexes_open",
            "Indexes opened for searching in this process.",
            registry=self.registry,
        )
        opened.set_function(open_indexes)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
