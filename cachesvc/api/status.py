"""``/status``, ``/healthz`` and the scheduler's pause and resume.

``/status`` asks the claim script for the budget (:meth:`Ledger.budget`), the one computation the
scheduler claims by, so the figure shown is the figure used. The Render Services are the keys the
registry watcher knows, re-read with one MGET (never a SCAN of the keyspace); how it discovers them
is the last field of ``daemon``, ``discovery``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.web.server import Request

from cachesvc.api.http import ApiError, Raw, envelope
from cachesvc.recache.discovery import IRegistry
from cachesvc.recache.gojson import encode_object
from cachesvc.recache.keys import PRIORITIES
from cachesvc.recache.ledger import Ledger
from cachesvc.recache.registry import Capacity, capacity_line, format_go_time, healthy_services
from cachesvc.recache.settings import RecacheSettings
from cachesvc.recache.state import SchedulerState
from cachesvc.recache.store import Store


class Status:
    log = Logger()

    def __init__(
        self, settings: RecacheSettings, store: Store, ledger: Ledger, state: SchedulerState, clock: Any,
        registry: IRegistry,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.ledger = ledger
        self.state = state
        self.clock = clock

    @inlineCallbacks
    def status(self, request: Request) -> Generator[Deferred[Any], Any, Raw]:
        now = self.clock.seconds()
        reserved = self.settings.rs_capacity_reserved
        services = healthy_services((yield self.registry.render_services(catch_up=True)), now)
        capacity = Capacity.of(services, reserved)
        line = capacity_line(services, reserved)
        snapshot = min((s.last_seen for s in services), default=now)
        budget = yield self.ledger.budget(line, sum(s.load for s in services), snapshot)
        host_ids = [h.id for h in self.settings.edge.hosts]
        counts = yield self.store.queue_counts(host_ids, int(now))
        dead = yield self.store.deadletter_counts(host_ids)
        size, max_size = self.state.size, self.state.max_size
        queues = {
            str(h): {**{p: {"total": counts[h][p].total, "due_now": counts[h][p].due_now} for p in PRIORITIES},
                     "dead_letter": dead[h]}
            for h in sorted(host_ids, key=str)
        }
        return Raw(encode_object([
            ("daemon", {"daemon_id": self.settings.daemon_id, "uptime_seconds": int(now - self.state.started_at),
                        "last_tick": format_go_time(self.state.last_tick),
                        "discovery": self.registry.describe()}),
            ("internal_queue", {"size": size, "max_size": max_size,
                                "capacity_used_percent": float(size) / max_size * 100 if max_size else 0.0}),
            ("rs_capacity", {"total_free_tabs": capacity.total_free, "reserved_for_online": capacity.reserved,
                             "available_for_recache": capacity.available,
                             "reservation_percent": capacity.reservation * 100,
                             "capacity_line": line, "recache_budget": max(0, budget.budget),
                             "in_flight": budget.in_flight}),
            ("queues", queues),
        ]))

    def pause(self, request: Request) -> bytes:
        return self._control(True)

    def resume(self, request: Request) -> bytes:
        return self._control(False)

    def _control(self, paused: bool) -> bytes:
        if not self.settings.scheduler_control_api:
            raise ApiError(403, "Scheduler control API not enabled")
        self.state.paused = paused
        message = "Scheduler paused" if paused else "Scheduler resumed"
        self.log.info(message)
        return envelope(True, message)

    @inlineCallbacks
    def healthz(self, request: Request) -> Generator[Deferred[Any], Any, tuple[int, bytes]]:
        try:
            yield self.store.ping()
        except Exception as e:
            return 503, envelope(False, f"redis unavailable: {e}")
        return 200, envelope(True)
