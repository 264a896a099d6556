"""The Cache Daemon API as one ``twisted.web`` site: every endpoint, by exact method and path."""

from __future__ import annotations

from typing import Any

from twisted.internet.threads import deferToThreadPool
from twisted.web.server import Site

from cachesvc.api.http import ApiResource, Handler, make_site
from cachesvc.api.listings import Listings
from cachesvc.api.queues import Queues
from cachesvc.api.status import Status
from cachesvc.api.writes import Compute, Writes
from cachesvc.metrics import Metrics
from cachesvc.recache.discovery import IRegistry
from cachesvc.recache.ledger import Ledger
from cachesvc.recache.settings import RecacheSettings
from cachesvc.recache.state import SchedulerState
from cachesvc.recache.store import Store


def in_threads(reactor: Any) -> Compute[Any]:
    """Run pure computation on the reactor's thread pool, off the reactor thread."""
    return lambda work: deferToThreadPool(reactor, reactor.getThreadPool(), work)


def api_resource(
    settings: RecacheSettings,
    store: Store,
    ledger: Ledger,
    state: SchedulerState,
    reactor: Any,
    metrics: Metrics | None = None,
    compute: Compute[Any] | None = None,
    *,
    registry: IRegistry,
) -> ApiResource:
    """The resource behind every path; *compute* defaults to the reactor's thread pool; ``/status`` reads
    the Render Services through *registry* (the scheduler's :class:`~cachesvc.recache.discovery.Discovery`)."""
    compute = compute or in_threads(reactor)
    edge = settings.edge
    writes = Writes(edge, store, reactor, settings.high_queue_limit, compute)
    listings = Listings(edge, store, reactor)
    queues = Queues(edge, store, reactor, compute)
    status = Status(settings, store, ledger, state, reactor, registry)
    routes: dict[tuple[bytes, bytes], Handler] = {
        (b"POST", b"/internal/cache/recache"): writes.recache,
        (b"POST", b"/internal/cache/invalidate"): writes.invalidate,
        (b"POST", b"/internal/cache/invalidate-all"): writes.invalidate_all,
        (b"GET", b"/status"): status.status,
        (b"GET", b"/internal/cache/urls"): listings.cache_urls,
        (b"GET", b"/internal/cache/summary"): listings.cache_summary,
        (b"GET", b"/internal/cache/queue"): queues.queue,
        (b"GET", b"/internal/cache/queue/summary"): queues.queue_summary,
        (b"GET", b"/internal/cache/deadletter"): queues.deadletter,
        (b"POST", b"/internal/cache/deadletter/requeue"): queues.requeue_deadletter,
        (b"POST", b"/internal/scheduler/pause"): status.pause,
        (b"POST", b"/internal/scheduler/resume"): status.resume,
    }
    return ApiResource(edge.auth_key, routes, reactor, settings.request_timeout, status.healthz, metrics)


def api_site(settings: RecacheSettings, resource: ApiResource) -> Site:
    """The site serving *resource*, with the body limit, timeouts and connection cap of *settings*."""
    return make_site(resource, settings.max_body_size, settings.request_timeout, settings.max_connections,
                     resource.reactor)
