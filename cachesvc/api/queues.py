"""The queue listings and the dead-letter set: ``/queue``, ``/queue/summary``, ``/deadletter`` and its requeue.

The queue listing reads only the page it returns (one script call: the queue sizes, then the
slices of the page), however long the queues are. The dead-letter listing is sorted by failure
time, so it reads the host's whole set and builds the page off the reactor thread.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.web.server import Request

from cachesvc.api import query
from cachesvc.api.http import ApiError, envelope
from cachesvc.api.writes import Compute
from cachesvc.recache.edgeconfig import EdgeConfig
from cachesvc.recache.gojson import GoJSONError
from cachesvc.recache.keys import PRIORITIES
from cachesvc.recache.members import decode_member
from cachesvc.recache.requests import INVALIDATE_ALL_REQUEST
from cachesvc.recache.store import Store


def deadletter_items(records: list[tuple[bytes, bytes, bytes]], names: dict[int, str]) -> list[dict[str, Any]]:
    """Dead-letter entries as listed, oldest failure first."""
    items = []
    for queue, member, raw in records:
        record = json.loads(raw)
        try:
            decoded = decode_member(member)
            url, dimension = decoded.url, names.get(decoded.dimension_id, "unknown")
        except GoJSONError:
            url, dimension = member.decode("utf-8", "replace"), "unknown"
        items.append({"url": url, "dimension": dimension, "priority": queue.decode().rsplit(":", 1)[-1],
                      "reason": record.get("reason", ""), "attempts": record.get("attempts", 0),
                      "failed_at": record.get("failed_at", 0)})
    items.sort(key=lambda i: (i["failed_at"], i["url"]))
    return items


class Queues:
    log = Logger()

    def __init__(self, edge: EdgeConfig, store: Store, clock: Any, compute: Compute[list[dict[str, Any]]]) -> None:
        self.edge = edge
        self.store = store
        self.clock = clock
        self.compute = compute

    @inlineCallbacks
    def queue(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        host = query.query_host(self.edge, request)
        size = query.limit(request)  # checked before the priority filter, as in Go
        priorities = list(PRIORITIES)
        raw = query.arg(request, "priority")
        if raw:
            priorities = [p.strip() for p in raw.split(",")]
            for p in priorities:
                if p not in PRIORITIES:
                    raise ApiError(400, f"invalid priority filter: {p}")
        start = query.offset(request)
        found = yield self.store.queue_page(host.id, priorities, start, size)
        names = query.dimension_names(host)
        items = []
        for entry in found.entries:
            try:
                member = decode_member(entry.member)
            except GoJSONError:
                self.log.warn("skipping malformed queue member {member!r}", member=entry.member)
                continue
            items.append({"url": member.url, "dimension": names.get(member.dimension_id, "unknown"),
                          "priority": entry.priority, "scheduled_at": int(float(entry.score))})
        return envelope(True, data=query.page(items, start, size, total=found.total))

    @inlineCallbacks
    def queue_summary(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        host = query.query_host(self.edge, request)
        counts = yield self.store.queue_counts([host.id], int(self.clock.seconds()))
        pending = sum(c.total for c in counts[host.id].values())
        inflight = yield self.store.inflight_summary(self.clock.seconds(), host.id)
        return envelope(True, data={"pending": pending, "processing": inflight.matching})

    @inlineCallbacks
    def deadletter(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        """Entries that will not be retried: rejected by a gateway, out of attempts, or undecodable."""
        host = query.query_host(self.edge, request)
        size, start = query.limit(request), query.offset(request)
        records = yield self.store.deadletters(host.id)
        names = query.dimension_names(host)
        items = yield self.compute(lambda: deadletter_items(records, names))
        return envelope(True, data={**query.page(items, start, size), "total": len(items)})

    @inlineCallbacks
    def requeue_deadletter(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        body = query.body(query.content(request), INVALIDATE_ALL_REQUEST)
        if body["host_id"] == 0:
            raise ApiError(400, "host_id is required")
        host = query.host(self.edge, body["host_id"])
        count = yield self.store.requeue_dead(host.id)
        self.log.info("re-queued {n} dead-lettered entries host_id={host_id}", n=count, host_id=host.id)
        return envelope(True, data={"host_id": host.id, "entries_requeued": count})
