"""``makeService(settings)``: the one function that builds cachesvc's service tree.

The twistd plugin, ``cachesvc.tac`` and the tests all call it, so they run the same tree:

    ServiceTree
      reload         SIGHUP re-reads the config file, SIGUSR1 rotates log files (first: before any port)
      purge          PurgeService (its port and worker threads)     when purge: is configured
      open-files     raises the open files limit (unless purge did) when eg_config is set
      redis          RedisClient (the pool, closed on stop)         when eg_config is set
      discovery      the registry watcher (scheduler and /status)
      http-api       the Cache Daemon API's port
      metrics        the Prometheus port (one for the process)      when metrics.enabled
      scheduler      the recache loop
      sd-notify      READY=1, STATUS=, WATCHDOG=1, STOPPING=1 to systemd (added last, so it stops first)

Children stop one at a time, last added first: the scheduler gives its unfinished entries back
through Redis before the Redis pool closes. The tree also owns the process's log output
(``logging:``): attached to a twistd ``Application`` it sets the application's log observer, which
twistd then uses instead of its own. An application that embeds one half calls
:func:`purge_service` or :func:`recache_services` and adds the services to an :class:`InOrder`
(or calls ``makeService(settings, standalone=False)``: no observer, signals or notifications).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Generator
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from cachesvc.api.routes import api_resource, api_site
from cachesvc.config import Settings
from cachesvc.listening import OpenFilesLimit, with_backlog
from cachesvc.metrics import Metrics, MetricsResource
from cachesvc.observe.logs import Console, LogControl
from cachesvc.observe.quiet import QuietSite
from cachesvc.observe.reload import Reloader
from cachesvc.observe.sdnotify import Notifier, Readiness, watchdog_interval
from cachesvc.purge.config import PurgeSettings
from cachesvc.purge.metrics import register_purge_metrics
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


class ServiceTree(InOrder):
    """The tree :func:`makeService` returns; it gives the twistd ``Application`` it joins its log observer."""

    def __init__(self, logs: LogControl | None = None) -> None:
        InOrder.__init__(self)
        self.logs = logs

    def setServiceParent(self, parent: Any) -> None:
        # twistd looks for an ILogObserver component on the application once the tree is built,
        # before logging begins (--logger, when given, still wins).
        logs = self.logs
        if logs is not None and isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, logs.observer)
        InOrder.setServiceParent(self, parent)


def makeService(
    settings: Settings, reactor: Any = None, *, console: Console | None = None, standalone: bool = True
) -> MultiService:
    """The whole tree for *settings*.

    *console* is where the console output goes (twistd's choice: standard output, the
    ``--logfile`` file or syslog; default standard output). With *standalone* false the tree
    leaves the log output, the signals and systemd alone, for an application it is part of.
    """
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
    logs = LogControl(settings.logging, console) if standalone else None
    top = ServiceTree(logs)
    parts: list[IService] = []  # built first: the reloader needs them, and starts before them
    metrics = None  # one registry for the process
    if settings.recache is not None:
        metrics = Metrics(settings.recache.metrics_namespace)
    elif settings.metrics is not None:
        metrics = Metrics(settings.metrics.namespace)
    purge = None
    if settings.purge is not None:
        purge = purge_service(settings.purge, reactor)
        parts.append(purge)
        if settings.metrics is not None and metrics is not None:
            register_purge_metrics(metrics.registry, purge)
    scheduler = None
    if settings.recache is not None:
        for service in recache_services(settings.recache, reactor, metrics):
            parts.append(service)
            if isinstance(service, Scheduler):
                scheduler = service
    elif settings.metrics is not None and metrics is not None:
        parts.append(metrics_port(metrics, settings.metrics.listen, settings.metrics.path, reactor))
    if standalone:
        cluster = purge.cluster if purge is not None else None
        readiness = Readiness(
            Notifier.from_environment(), reactor, settings.summary(), watchdog_interval(),
            waits_for=cluster.when_open if cluster is not None else None,
        )
        state = scheduler.state if scheduler is not None else None
        # First: its signal handlers are in place before any port listens. Last: readiness starts
        # when the rest has, and stops first.
        parts = [Reloader(settings, reactor, purge, scheduler, state, logs, readiness), *parts, readiness]
    for service in parts:
        service.setServiceParent(top)
    return top


def metrics_port(metrics: Metrics, listen: str, path: str, reactor: Any) -> IService:
    """The Prometheus port: *metrics*' registry at exactly *path*, no access-log line per scrape."""
    return _named(strports.service(listen, QuietSite(MetricsResource(metrics, path)), reactor=reactor), "metrics")


def purge_service(settings: PurgeSettings, reactor: Any) -> PurgeService:
    """The SpinupWP-compatible purge daemon alone."""
    return PurgeService(settings, reactor)


def recache_services(settings: RecacheSettings, reactor: Any, metrics: Metrics | None = None) -> list[IService]:
    """The Cache Daemon's services, in start order: the open files limit, Redis, the API and metrics ports, then
    the scheduler.

    *metrics* is the registry to record into (and serve, when ``metrics.enabled``); a new one by default.
    """
    if metrics is None:
        metrics = Metrics(settings.metrics_namespace)
    deadline = min(3.0, settings.request_timeout)  # of every Redis call, pool and pub/sub connection alike
    redis = RedisClient(settings.redis_addr, settings.redis_password, settings.redis_db, reactor,
                        timeout=deadline, metrics=metrics)
    store = Store(redis)
    ledger = Ledger(redis, settings.daemon_id, settings.lease, reactor)
    state = SchedulerState(started_at=reactor.seconds(), max_size=settings.max_size)
    pubsub = RedisPubSub(settings.redis_addr, settings.redis_password, settings.redis_db, reactor, timeout=deadline)
    registry = Discovery(store, pubsub, settings.redis_db, reactor, timeout=deadline)
    services: list[IService] = [OpenFilesLimit(), redis, registry]
    if settings.api_enabled:
        resource = api_resource(settings, store, ledger, state, reactor, metrics, registry=registry)
        listen = with_backlog(settings.api_listen)  # 1,024 unless the endpoint sets one
        services.append(_named(strports.service(listen, api_site(settings, resource), reactor=reactor), "http-api"))
    else:
        log.warn("HTTP API is disabled in configuration")
    if settings.metrics_enabled:
        services.append(metrics_port(metrics, settings.metrics_listen, settings.metrics_path, reactor))
    client, pool = pooled_client(reactor, settings.max_size)
    dispatcher = Dispatcher(client, reactor, settings.edge.auth_key, settings.timeout_per_url, pool)
    services.append(Scheduler(settings, store, ledger, dispatcher, state, reactor, metrics, registry))
    return services


def _named(service: IService, name: str) -> IService:
    service.setName(name)
    return service
