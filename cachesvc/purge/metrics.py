"""Prometheus metrics of the purge half: ``cachesvc_purge_…`` and ``cachesvc_warm_…``.

Purges are counted as they finish (the purger's observers). Everything else is read from the
service when the registry is collected, and costs nothing between scrapes: the trash's slot count,
the warmer's counters and gauges, each tag index's size (two ``len()``: never a walk of an index
under its lock), the open connections.

The files and bytes waiting in the trash are counted by walking it, which must not block the
reactor: a collection starts a walk on the purge service's census lane (a worker thread of its own
at nice 19, so a walk never waits behind a long delete or scan) when the last one began at least
:data:`CENSUS_INTERVAL` seconds ago, and shows the figures of the last walk that finished.
A walk stops after :data:`CENSUS_MAX_ENTRIES` entries or :data:`CENSUS_MAX_SECONDS`; its figures
are then lower bounds (``cachesvc_purge_trash_census_complete`` 0). Until the first walk has
finished, the two series are absent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.logger import Logger

import cachesvc.metrics  # noqa: F401 -- no _created series: the module turns them off on import
from cachesvc.purge.purger import Purged
from cachesvc.purge.workers import WorkerThread

if TYPE_CHECKING:
    from cachesvc.purge.service import PurgeService

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: a path purge takes well under a millisecond, a prefix or tag scan of a big zone seconds."""

CENSUS_INTERVAL = 15.0
"""Seconds between the starts of two walks of the trash, at most one at a time."""

CENSUS_MAX_ENTRIES = 1_000_000
CENSUS_MAX_SECONDS = 5.0

Start = Callable[[Callable[[], None]], None]
"""Runs a callable on another thread: :func:`on_lane` (tests pass one that runs it at once)."""

log = Logger()


@dataclass(frozen=True)
class Census:
    """What a walk of the trash found: regular files and others, the disk they take, whether it saw all."""

    files: int
    bytes: int
    complete: bool
    finished: float  # the clock's seconds


def count_tree(
    path: str, max_entries: int = CENSUS_MAX_ENTRIES, max_seconds: float = CENSUS_MAX_SECONDS,
    monotonic: Callable[[], float] = time.monotonic,
) -> tuple[int, int, bool]:
    """Blocking: (files, bytes of allocated blocks, complete) of everything below *path*, never following symlinks.

    Entries that vanish while it walks (the trash deletes as it goes) are skipped, as are
    directories it cannot read. ``complete`` is false when it stopped at a bound.
    """
    files = size = seen = 0
    deadline = monotonic() + max_seconds
    pending = [path]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    seen += 1
                    if seen > max_entries or (seen % 1024 == 0 and monotonic() > deadline):
                        return files, size, False
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                            continue
                        blocks = entry.stat(follow_symlinks=False).st_blocks
                    except OSError:
                        continue
                    files += 1
                    size += blocks * 512
        except OSError:
            continue
    return files, size, True


def on_lane(lane: WorkerThread) -> Start:
    """A :data:`Start` that hands the walk to *lane* (call it from the reactor thread, as collections are)."""

    def start(work: Callable[[], None]) -> None:
        lane.submit(work).addErrback(lambda failure: log.failure("the trash census failed", failure))

    return start


class TrashCensus:
    """The last finished count of the trash at *path*; :meth:`poll` starts a new one when it is due."""

    def __init__(
        self, path: str, start: Start, clock: Callable[[], float] = time.monotonic,
        interval: float = CENSUS_INTERVAL,
    ) -> None:
        self.path = path
        self.last: Census | None = None
        self._start = start
        self._clock = clock
        self._interval = interval
        self._running = False
        self._began: float | None = None

    def poll(self) -> Census | None:
        """Called at each collection: start a walk if due and none runs; return the last finished one."""
        now = self._clock()
        if not self._running and (self._began is None or now - self._began >= self._interval):
            self._running, self._began = True, now
            try:
                self._start(self._walk)
            except Exception:  # no thread to be had: try again at a later collection
                self._running = False
        return self.last

    def _walk(self) -> None:
        """On the walk's thread; the result is handed over by one assignment."""
        try:
            files, size, complete = count_tree(self.path)
            self.last = Census(files, size, complete, self._clock())
        finally:
            self._running = False


class PurgeCollector(Collector):
    """The figures read from the service at each collection."""

    def __init__(self, purge: PurgeService, census: TrashCensus) -> None:
        self._purge = purge
        self._census = census

    def collect(self) -> Iterable[Metric]:
        purge = self._purge
        yield _gauge("purge_connections", "Purge connections open now.", purge.factory.opened)
        yield _gauge("purge_connections_max", "Purge connections allowed at once (purge.max_connections).",
                     purge.factory.max_connections)
        yield _gauge("purge_trash_backlog_directories",
                     "Directories moved into the trash by site purges and not yet deleted.", purge.trash.backlog)
        census = self._census.poll()
        if census is not None:
            yield _gauge("purge_trash_backlog_files",
                         "Files in the trash waiting for deletion, as last counted.", census.files)
            yield _gauge("purge_trash_backlog_bytes",
                         "Disk space the files in the trash take (allocated blocks), as last counted.", census.bytes)
            yield _gauge("purge_trash_census_complete",
                         "1 when the last count of the trash saw all of it; 0: the figures are lower bounds.",
                         int(census.complete))
        yield from self._warm()
        yield from self._tags()

    def _warm(self) -> Iterable[Metric]:
        warmer = self._purge.warmer
        if warmer is None:
            return
        requests = CounterMetricFamily(
            "cachesvc_warm_requests", "Warm-up requests answered, by outcome (warmed, slow, http_5xx, failed).",
            labels=["outcome"],
        )
        for outcome, count in warmer.outcomes.items():
            requests.add_metric([outcome], count)
        yield requests
        yield CounterMetricFamily(
            "cachesvc_warm_skipped_urls",
            "Purged URLs not warmed: over purge.warm.max_entries, not sendable, or purged again before their turn.",
            value=warmer.skipped_urls,
        )
        yield _gauge("warm_concurrency_limit", "Warm-up requests allowed in flight now (halved when slow).",
                     warmer.limit)
        yield _gauge("warm_concurrency_max", "The most warm-up requests in flight (purge.warm.concurrency).",
                     max(1, warmer.settings.concurrency))
        yield _gauge("warm_in_flight_requests", "Warm-up requests in flight.", warmer.in_flight)
        yield _gauge("warm_pending_urls", "URLs waiting to be warmed.", warmer.pending)

    def _tags(self) -> Iterable[Metric]:
        tags = self._purge.tags
        if tags is None:
            return
        labels = ["zone"]
        entries = GaugeMetricFamily("cachesvc_purge_tag_index_entries", "Cache entries with tags in a zone's index.",
                                    labels=labels)
        distinct = GaugeMetricFamily("cachesvc_purge_tag_index_tags", "Distinct tags in a zone's index.",
                                     labels=labels)
        whole = GaugeMetricFamily(
            "cachesvc_purge_tag_index_whole",
            "1 when a zone's index answers tag purges; 0 while its cold scan runs or after lost inotify events.",
            labels=labels,
        )
        scans = CounterMetricFamily("cachesvc_purge_tag_index_scans", "Cold scans of a zone's directory started.",
                                    labels=labels)
        for path, index in sorted(list(tags.indexes.items())):  # list(): one step, while the lanes add zones
            entries.add_metric([path], len(index.entries))  # len() needs no lock: a scrape never waits on a scan
            distinct.add_metric([path], len(index.by_tag))
            whole.add_metric([path], int(index.whole))
            scans.add_metric([path], index.scans)
        yield from (entries, distinct, whole, scans)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"cachesvc_{name}", documentation, value=value)


def register_purge_metrics(
    registry: CollectorRegistry, purge: PurgeService, *, census: TrashCensus | None = None
) -> None:
    """Register the purge half's metrics on *registry* and observe *purge*'s purges.

    *census* counts the trash (default: walks of ``purge.trash.path`` on *purge*'s census lane).
    """
    requests = Counter(
        "cachesvc_purge_requests", "Purge requests answered, by form (path, url, prefix, tag), mode and outcome.",
        ["form", "mode", "outcome"], registry=registry,
    )
    duration = Histogram(
        "cachesvc_purge_duration_seconds", "Time from a purge request to its reply, by form.", ["form"],
        buckets=DURATION_BUCKETS, registry=registry,
    )
    entries = Counter(
        "cachesvc_purge_entries", "Cache entries purged (deleted or marked expired), by mode.", ["mode"],
        registry=registry,
    )

    def observe(purged: Purged) -> None:
        requests.labels(purged.form, purged.mode, purged.outcome).inc()
        duration.labels(purged.form).observe(purged.seconds)
        if purged.entries:
            entries.labels(purged.mode).inc(purged.entries)

    purge.purger.observers.append(observe)
    registry.register(PurgeCollector(purge, census or TrashCensus(purge.trash.path, on_lane(purge.census_lane))))
