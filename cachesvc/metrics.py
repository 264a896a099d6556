"""Prometheus metrics: the EdgeComet CD's names (``{namespace}_cd_…``), actually recorded.

Served by a small twisted.web resource around ``generate_latest()`` at exactly ``metrics.path``
(anything else is a plain 404, as in Go), on its own port. A :class:`Metrics` registry carries the
process's own figures too (``process_*``, ``python_info``), and no counter or histogram exports a
``_created`` series: importing this module turns them off for the process (they doubled the
exposition and no dashboard reads them).
"""

from __future__ import annotations

from typing import TypedDict

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from twisted.web.resource import Resource
from twisted.web.server import Request

disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated


def process_registry() -> CollectorRegistry:
    """A new registry with the process's metrics (CPU, memory, open files, start time) and ``python_info``."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class _Common(TypedDict):
    namespace: str
    subsystem: str
    registry: CollectorRegistry


class Metrics:
    def __init__(self, namespace: str = "edgecomet", registry: CollectorRegistry | None = None) -> None:
        self.registry = process_registry() if registry is None else registry
        common: _Common = {"namespace": namespace, "subsystem": "cd", "registry": self.registry}
        self.recache_requests = Counter(
            "recache_requests", "Recache requests sent to Edge Gateways, by outcome and queue.",
            ["status", "queue_type"], **common,
        )
        self.queue_depth = Gauge(
            "queue_depth", "Entries waiting in the Redis queues, by queue.", ["queue_type"], **common
        )
        self.recache_duration = Histogram(
            "recache_duration_seconds", "Time an Edge Gateway took to answer a recache request.", **common
        )
        self.redis_operations = Counter(
            "redis_operations", "Redis calls, by command and outcome.", ["operation", "status"], **common
        )
        self.eg_requests = Counter(
            "eg_requests", "Requests to Edge Gateways, by gateway and outcome.", ["eg_id", "status"], **common
        )
        self.api_requests = Counter(
            "api_requests", "HTTP API requests, by endpoint and status code.", ["endpoint", "code"], **common
        )
        self.in_flight = Gauge("in_flight", "Recache requests this daemon has in flight.", **common)
        self.dead_letters = Counter(
            "dead_letters", "Entries moved to the dead-letter set, by reason.", ["reason"], **common
        )


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics, path: str) -> None:
        Resource.__init__(self)
        self._metrics = metrics
        self._path = path.encode()

    def render_GET(self, request: Request) -> bytes:
        if request.path != self._path:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Not Found"
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._metrics.registry)
