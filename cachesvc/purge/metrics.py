"""Prometheus metrics for the purge service (``cachesvc_purge_…``, ``cachesvc_warm_…``, ``cachesvc_tag_index_…``).

Counters and the duration histogram are fed by the purger's observers; everything else is read
from the service when the registry is collected.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cachesvc.purge.purger import Purged

if TYPE_CHECKING:
    from cachesvc.purge.service import PurgeService


class _PurgeGauges(Collector):
    def __init__(self, purge: PurgeService) -> None:
        self._purge = purge

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "cachesvc_purge_trash_backlog_directories",
            "Purged directories moved to the trash and not yet deleted.",
            value=self._purge.trash.backlog,
        )


def register_purge_metrics(registry: CollectorRegistry, purge: PurgeService) -> None:
    """Register the purge service's metrics on *registry* and observe its purges."""
    requests = Counter(
        "cachesvc_purge_requests", "Purge requests, by form, mode and outcome.", ["form", "mode", "outcome"],
        registry=registry,
    )
    duration = Histogram(
        "cachesvc_purge_duration_seconds", "Time from a purge request to its reply.", registry=registry
    )
    entries = Counter("cachesvc_purge_entries", "Cache entries purged, by mode.", ["mode"], registry=registry)

    def observe(purged: Purged) -> None:
        requests.labels(purged.form, purged.mode, purged.outcome).inc()
        duration.observe(purged.seconds)
        if purged.entries:
            entries.labels(purged.mode).inc(purged.entries)

    purge.purger.observers.append(observe)
    registry.register(_PurgeGauges(purge))
