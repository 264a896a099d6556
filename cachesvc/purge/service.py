"""The purge service: the listening port plus the thread pool that does the deleting."""

from __future__ import annotations

from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred

from cachesvc.config import PurgeConfig
from cachesvc.purge.deleter import BatchingDeleter
from cachesvc.purge.lane import WorkerThread
from cachesvc.purge.paths import PathPolicy
from cachesvc.purge.protocol import PurgeFactory
from cachesvc.purge.purger import Purger

class PurgeService(MultiService):
    """Listens on ``config.listen``; owns the deletion thread, which is stopped after the port closes."""

    def __init__(self, config: PurgeConfig, reactor: Any) -> None:
        super().__init__()
        self.setName("purge")
        self.lane = WorkerThread(reactor, "cachesvc-purge")
        self.purger = Purger(PathPolicy(config.roots), BatchingDeleter(self.lane), reactor)
        self.factory = PurgeFactory(self.purger, reactor, config.idle_timeout, config.max_line_length)
        port = strports.service(config.listen, self.factory, reactor=reactor)
        port.setName("purge-port")
        port.setServiceParent(self)

    def startService(self) -> None:
        self.lane.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        d = maybeDeferred(super().stopService)
        d.addBoth(lambda result: self.lane.stop().addCallback(lambda _: result))
        return d
