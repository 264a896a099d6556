"""The recache half as a service: Redis, the shared scheduler state, and the HTTP API."""

from __future__ import annotations

from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from cachesvc.api.cacheapi import CacheAPI
from cachesvc.metrics import Metrics, metrics_site
from cachesvc.recache.redisclient import RedisClient
from cachesvc.recache.scheduler import Scheduler
from cachesvc.recache.settings import RecacheSettings
from cachesvc.recache.state import SchedulerState
from cachesvc.recache.store import Store


class RecacheService(MultiService):
    log = Logger()

    def __init__(self, settings: RecacheSettings, reactor: Any) -> None:
        super().__init__()
        self.setName("recache")
        self.settings = settings
        self.metrics = Metrics(settings.metrics_namespace)
        self.redis = RedisClient(settings.redis_addr, settings.redis_password, settings.redis_db, reactor,
                                 timeout=min(3.0, settings.request_timeout), metrics=self.metrics)
        self.store = Store(self.redis)
        self.state = SchedulerState(started_at=reactor.seconds(), max_size=settings.max_size)
        self.api = CacheAPI(settings, self.store, self.state, reactor, self.metrics)
        if settings.api_enabled:
            port = strports.service(settings.api_listen, self.api.site(reactor), reactor=reactor)
            port.setName("http-api")
            port.setServiceParent(self)
        else:
            self.log.warn("HTTP API is disabled in configuration")
        if settings.metrics_enabled:
            metrics_port = strports.service(settings.metrics_listen, metrics_site(self.metrics, settings.metrics_path), reactor=reactor)
            metrics_port.setName("metrics")
            metrics_port.setServiceParent(self)
        self.scheduler = Scheduler(settings, self.store, self.state, reactor, self.metrics)
        self.scheduler.setName("scheduler")
        self.scheduler.setServiceParent(self)  # added last: stopped first, before the API and Redis

    def startService(self) -> None:
        self.log.info("Starting Cache Daemon daemon_id={daemon_id} hosts={hosts} redis={redis}",
                      daemon_id=self.settings.daemon_id, hosts=len(self.settings.edge.hosts), redis=self.settings.redis_addr)
        super().startService()

    def stopService(self) -> Deferred[None]:
        d = maybeDeferred(super().stopService)
        d.addBoth(lambda result: self.redis.close().addBoth(lambda _: result))
        return d
