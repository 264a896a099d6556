"""``makeService(settings)``: the one function that builds cachesvc's service tree.

The twistd plugin, ``cachesvc.tac`` and the tests all call it, so they run the same tree:

    MultiService
      purge          PurgeService (its port and worker threads)     when purge: is configured
      redis          RedisClient (the pool, closed on stop)         when eg_config is set
      discovery      the registry watcher (scheduler and /status)
      http-api       the Cache Daemon API's port
      metrics        the Prometheus port
      scheduler      the recache loop (added last, so it stops first)

Children stop one at a time, last added first: the scheduler gives its unfinished entries back
through Redis before the Redis pool closes. An application that embeds one half calls
:func:`purge_service` or :func:`recache_services` and adds the services to an :class:`InOrder`.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Generator
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.logger import Logger

from cachesvc.api.routes import api_resource, api_site
from cachesvc.config import Settings
from cachesvc.metrics import Metrics, metrics_site
from cachesvc.purge.config import PurgeSettings
from cachesvc.purge.service import PurgeService
from cachesvc.recache.discovery import Discovery
from cachesvc.recache.dispatch import Dispatcher, pooled_client
from cachesvc.recache.ledger import Ledger
from cachesvc.recache.pubsub import RedisPubSub
from cachesvc.recache.redisclient import RedisClient
from cachesvc.recache.scheduler import Scheduler
from cachesvc.recache.settings import RecacheSettings
from cachesvc.recache.state import SchedulerState
from cachesvc.recache.store import Store

log = Logger()

SWITCH_INTERVAL = 0.0005
"""How long the reactor thread may wait for the GIL held by a thread doing pure computation.

Python's default, 5 ms, is paid on every hand-off: a purge reply needs several (reactor, deleter
thread, reactor), so while the API prepares a 10,000-URL body on a pool thread, purges waited
up to 200 ms. At 0.5 ms the worst case stays under 50 ms (bench/stall_bench.py).
"""


class InOrder(MultiService):
    """A MultiService whose children stop one after another, the last added first."""

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        Service.stopService(self)
        for service in reversed(list(self)):
            try:
                yield maybeDeferred(service.stopService)
            except Exception:
                log.failure("stopping {service} failed", service=service.name)


def makeService(settings: Settings, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if sys.getswitchinterval() > SWITCH_INTERVAL:
        sys.setswitchinterval(SWITCH_INTERVAL)
    # What start-up made lives as long as the process: keep it out of the collector's full passes,
    # which hold the GIL for as long as they take.
    reactor.callWhenRunning(gc.freeze)
    for warning in settings.warnings:  # found while the files were read, before twistd's logging began
        reactor.callWhenRunning(log.warn, "{warning}", warning=warning)
    top = InOrder()
    if settings.purge is not None:
        purge_service(settings.purge, reactor).setServiceParent(top)
    if settings.recache is not None:
        for service in recache_services(settings.recache, reactor):
            service.setServiceParent(top)
    return top


def purge_service(settings: PurgeSettings, reactor: Any) -> PurgeService:
    """The SpinupWP-compatible purge daemon alone."""
    return PurgeService(settings, reactor)


def recache_services(settings: RecacheSettings, reactor: Any) -> list[IService]:
    """The Cache Daemon's services, in start order: Redis, the API and metrics ports, then the scheduler."""
    metrics = Metrics(settings.metrics_namespace)
    deadline = min(3.0, settings.request_timeout)  # of every Redis call, pool and pub/sub connection alike
    redis = RedisClient(settings.redis_addr, settings.redis_password, settings.redis_db, reactor,
                        timeout=deadline, metrics=metrics)
    store = Store(redis)
    ledger = Ledger(redis, settings.daemon_id, settings.lease, reactor)
    state = SchedulerState(started_at=reactor.seconds(), max_size=settings.max_size)
    pubsub = RedisPubSub(settings.redis_addr, settings.redis_password, settings.redis_db, reactor, timeout=deadline)
    registry = Discovery(store, pubsub, settings.redis_db, reactor, timeout=deadline)
    services: list[IService] = [redis, registry]
    if settings.api_enabled:
        resource = api_resource(settings, store, ledger, state, reactor, metrics, registry=registry)
        services.append(_named(strports.service(settings.api_listen, api_site(settings, resource), reactor=reactor),
                               "http-api"))
    else:
        log.warn("HTTP API is disabled in configuration")
    if settings.metrics_enabled:
        site = metrics_site(metrics, settings.metrics_path)
        services.append(_named(strports.service(settings.metrics_listen, site, reactor=reactor), "metrics"))
    client, pool = pooled_client(reactor, settings.max_size)
    dispatcher = Dispatcher(client, reactor, settings.edge.auth_key, settings.timeout_per_url, pool)
    services.append(Scheduler(settings, store, ledger, dispatcher, state, reactor, metrics, registry))
    return services


def _named(service: IService, name: str) -> IService:
    service.setName(name)
    return service
