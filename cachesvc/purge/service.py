"""The purge service: the listening port plus the thread pool that does the deleting."""

from __future__ import annotations

from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.threadpool import ThreadPool

from cachesvc.config import PurgeConfig
from cachesvc.purge.deleter import ThreadPoolDeleter
from cachesvc.purge.paths import PathPolicy
from cachesvc.purge.protocol import PurgeFactory
from cachesvc.purge.purger import Purger

DELETE_THREADS = 4
"""Deletions are disk-bound; a few threads keep many small purges flowing without thrashing."""


class PurgeService(MultiService):
    """Listens on ``config.listen``; owns a bounded thread pool that is stopped after the port closes."""

    def __init__(self, config: PurgeConfig, reactor: Any) -> None:
        super().__init__()
        self.setName("purge")
        self.pool = ThreadPool(minthreads=0, maxthreads=DELETE_THREADS, name="cachesvc-purge")
        self.purger = Purger(PathPolicy(config.roots), ThreadPoolDeleter(reactor, self.pool), reactor)
        self.factory = PurgeFactory(self.purger, reactor, config.idle_timeout, config.max_line_length)
        port = strports.service(config.listen, self.factory, reactor=reactor)
        port.setName("purge-port")
        port.setServiceParent(self)

    def startService(self) -> None:
        self.pool.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        d = maybeDeferred(super().stopService)
        d.addBoth(lambda result: (self.pool.stop(), result)[1])
        return d
