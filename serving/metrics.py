"""Prometheus metrics of the request path, in one registry per ingress.

Replicas report per-request timings (queue, compute, batch size, queue depth)
on the internal protocol, so everything is recorded in the ingress process and
scraped from its ``/metrics`` with no cross-process merging.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from flywheel.serving._private.wire import Stats

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServingMetrics:
    """Request metrics by model and version. Not thread-safe beyond what
    prometheus-client guarantees; used from the ingress loop only."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model", "version"]
        self.requests = Counter(
            "flywheel_requests", "Inference requests by outcome (ok or an error code name)",
            [*labels, "outcome"], registry=self.registry,
        )
        self.latency = Histogram(
            "flywheel_request_latency_seconds", "Time from request parsed to response ready, in the ingress",
            labels, buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_time = Histogram(
            "flywheel_queue_time_seconds", "Time a request waited in the replica's batch queue",
            labels, buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.compute_time = Histogram(
            "flywheel_compute_time_seconds", "Model time of the batch a request ran in",
            labels, buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "flywheel_batch_size", "Rows per model call", labels,
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge(
            "flywheel_queue_depth", "Requests queued in the replica, as last reported",
            labels, registry=self.registry,
        )
        self.retries = Counter(
            "flywheel_replica_retries", "Requests sent again after their replica connection failed",
            labels, registry=self.registry,
        )
        self._children: dict[tuple[str, str], tuple] = {}

    def _for(self, model: str, version: str) -> tuple:
        key = (model, version)
        kids = self._children.get(key)
        if kids is None:  # labels() costs a lock and a dict walk: do it once
            kids = (
                self.latency.labels(model, version),
                self.queue_time.labels(model, version),
                self.compute_time.labels(model, version),
                self.batch_size.labels(model, version),
                self.queue_depth.labels(model, version),
            )
            self._children[key] = kids
        return kids

    def observe(self, model: str, version: str, outcome: str, latency_s: float, stats: Stats) -> None:
        latency, queue, compute, batch, depth = self._for(model, version)
        self.requests.labels(model, version, outcome).inc()
        latency.observe(latency_s)
        if outcome == "ok":
            queue.observe(stats.queue_us / 1e6)
            compute.observe(stats.compute_us / 1e6)
            if stats.leader:
                batch.observe(stats.batch_rows)
        depth.set(stats.queue_depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
