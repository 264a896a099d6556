"""The purge service: the listening port and the worker threads behind it.

Three threads, each injected into what uses it: the deleter's (every purge's filesystem work),
the scanner's (prefix scans, which may take long and must not delay the others) and the trash's
(background deletion at nice 19).
"""

from __future__ import annotations

from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred

from cachesvc.purge.config import PurgeSettings
from cachesvc.purge.deleter import BatchingDeleter, delete_now
from cachesvc.purge.nginxcache import PrefixScanner
from cachesvc.purge.paths import PathPolicy
from cachesvc.purge.protocol import PurgeFactory
from cachesvc.purge.purger import Purger
from cachesvc.purge.trash import Trash
from cachesvc.purge.workers import WorkerThread
from cachesvc.purge.zones import ZoneMap


class PurgeService(MultiService):
    """Listens on ``settings.listen``; its threads stop after the port has closed."""

    def __init__(self, settings: PurgeSettings, reactor: Any) -> None:
        MultiService.__init__(self)
        self.setName("purge")
        policy = PathPolicy(settings.roots, trash=settings.trash_dir)
        self.lane = WorkerThread(reactor, "cachesvc-purge")
        self.scan_lane = WorkerThread(reactor, "cachesvc-scan")
        self.trash_lane = WorkerThread(reactor, "cachesvc-trash", nice=19)
        self.trash = Trash(settings.trash_dir, settings.roots, self.trash_lane, reactor)
        deleter = BatchingDeleter(self.lane, lambda target: delete_now(target, self.trash))
        scanner = PrefixScanner(self.scan_lane, reactor)
        self.purger = Purger(policy, deleter, reactor, ZoneMap(settings.zones, policy), scanner)
        self.factory = PurgeFactory(self.purger, reactor, settings.idle_timeout, settings.max_line_length)
        port = strports.service(settings.listen, self.factory, reactor=reactor)
        port.setName("purge-port")
        port.setServiceParent(self)

    def startService(self) -> None:
        self.trash.open()  # starts the trash's thread when the trash is usable
        self.lane.start()
        self.scan_lane.start()
        MultiService.startService(self)

    def stopService(self) -> Deferred[None]:
        d = maybeDeferred(super().stopService)
        d.addBoth(self._stop_threads)
        return d

    def _stop_threads(self, result: Any) -> Any:
        self.trash.close()  # the next start deletes what is left in the trash
        self.scan_lane.abandon()
        return self.lane.stop().addCallback(lambda _: result)
