"""The purge service: the listening port, the deletion thread, the trash and the prefix scanner."""

from __future__ import annotations

from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred

from cachesvc.config import PurgeConfig
from cachesvc.purge.deleter import BatchingDeleter, delete_now
from cachesvc.purge.lane import WorkerThread
from cachesvc.purge.nginxcache import PrefixScanner
from cachesvc.purge.paths import PathPolicy
from cachesvc.purge.protocol import PurgeFactory
from cachesvc.purge.purger import Purger
from cachesvc.purge.trash import Trash
from cachesvc.purge.zones import ZoneMap


class PurgeService(MultiService):
    """Listens on ``config.listen``; its threads stop after the port has closed."""

    def __init__(self, config: PurgeConfig, reactor: Any) -> None:
        super().__init__()
        self.setName("purge")
        assert config.trash_dir is not None, "run config.check_purge first"
        policy = PathPolicy(config.roots, trash=config.trash_dir)
        self.trash = Trash(config.trash_dir, config.roots, reactor)
        self.lane = WorkerThread(reactor, "cachesvc-purge")
        self.scanner = PrefixScanner(reactor)
        deleter = BatchingDeleter(self.lane, lambda target: delete_now(target, self.trash))
        zones = ZoneMap(config.zones, policy)
        self.purger = Purger(policy, deleter, reactor, zones, self.trash, self.scanner)
        self.factory = PurgeFactory(self.purger, reactor, config.idle_timeout, config.max_line_length)
        port = strports.service(config.listen, self.factory, reactor=reactor)
        port.setName("purge-port")
        port.setServiceParent(self)

    def startService(self) -> None:
        self.trash.open()
        self.lane.start()
        self.scanner.lane.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        d = maybeDeferred(super().stopService)
        d.addBoth(self._stop_threads)
        return d

    def _stop_threads(self, result: Any) -> Any:
        self.trash.close()  # the next start deletes what is left in the trash
        self.scanner.lane.abandon()
        return self.lane.stop().addCallback(lambda _: result)
