"""The purge service: the listening port and the worker threads behind it.

Threads, each injected into what uses it: the deleter's (every purge's filesystem work, and the
cluster's listing of the zones it purges after missing entries), the scanner's lanes (prefix scans,
which may take long and must not delay the others; zones share them fairly), the trash's
(background deletion at nice 19, with normal-priority lanes that help while it falls behind) and
the census's (the metrics' walks of the trash, at nice 19, never behind a delete or a scan).

At start the soft limit on open files is raised to the hard limit, once for the process (the usual
soft 1,024 is about 1,000 connections), and the port listens with a backlog of 1,024 unless the
endpoint sets one (cachesvc/listening.py).
"""

from __future__ import annotations

from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from cachesvc import __version__
from cachesvc.listening import raise_open_files_limit_once, with_backlog
from cachesvc.purge.cluster import Cluster
from cachesvc.purge.config import PurgeSettings
from cachesvc.purge.deleter import BatchingDeleter, delete_now
from cachesvc.purge.keyurl import why_not_invertible
from cachesvc.purge.nginxcache import PrefixScanner
from cachesvc.purge.paths import PathPolicy
from cachesvc.purge.protocol import IPurge, PurgeFactory
from cachesvc.purge.purger import Purger
from cachesvc.purge.tags import header_names
from cachesvc.purge.tagwatch import TagIndex
from cachesvc.purge.trash import Trash
from cachesvc.purge.warm import Warmer
from cachesvc.purge.workers import WorkerThread
from cachesvc.purge.zones import ZoneMap

FD_RESERVE = 64
"""Open files kept for what is not a purge connection: Redis, the API, the log, the threads' walks."""

TRASH_CATCH_UP_LANES = 3
"""Normal-priority threads that help the nice-19 trash thread while its backlog is long."""

SCAN_LANES = 2
"""Threads for prefix scans: a zone uses one at a time, so another zone's scan never waits behind it."""


class PurgeService(MultiService):
    """Listens on ``settings.listen``; its threads stop after the port has closed."""

    log = Logger()

    def __init__(self, settings: PurgeSettings, reactor: Any) -> None:
        MultiService.__init__(self)
        self.setName("purge")
        policy = PathPolicy(settings.roots, trash=settings.trash_dir)
        self.lane = WorkerThread(reactor, "cachesvc-purge")
        self.scan_lanes = [WorkerThread(reactor, f"cachesvc-scan-{i}") for i in range(SCAN_LANES)]
        self.trash_lanes = [WorkerThread(reactor, "cachesvc-trash", nice=19)]
        catch_up = [WorkerThread(reactor, f"cachesvc-trash-catch-up-{i}") for i in range(TRASH_CATCH_UP_LANES)]
        self.trash_lanes += catch_up
        self.census_lane = WorkerThread(reactor, "cachesvc-census", nice=19)  # the metrics' walks of the trash
        self.trash = Trash(settings.trash_dir, settings.roots, self.trash_lanes[:1], reactor, catch_up)
        trash = self.trash
        deleter = BatchingDeleter(self.lane, lambda target, harvest, roots: delete_now(target, trash, harvest, roots))
        scanner = PrefixScanner(self.scan_lanes, reactor)
        self.warmer: Warmer | None = None
        if settings.warm.enabled:
            self.warmer = Warmer(settings.warm, reactor, __version__)
            self.addService(self.warmer)
        self.tags: TagIndex | None = None
        self.tag_lanes: list[WorkerThread] = []
        if settings.tags.enabled:
            self.tag_lanes = [WorkerThread(reactor, "cachesvc-tags"), WorkerThread(reactor, "cachesvc-tag-scan")]
            lane, scan_lane = self.tag_lanes
            self.tags = TagIndex(
                settings.zones, policy, header_names(settings.tags.headers), lane, scan_lane, reactor, self.trash
            )
        self.purger = Purger(
            policy, deleter, reactor, ZoneMap(settings.zones, policy), scanner, mode=settings.mode,
            warm=self.warmer.warm if self.warmer is not None else None, warm_limit=settings.warm.max_entries,
            reactor=reactor, tags=self.tags,
        )
        self._zones = settings.zones
        self.settings = settings
        self._policy = policy
        self._reactor = reactor
        served: IPurge = self.purger
        self.cluster: Cluster | None = None
        if settings.cluster is not None:
            self.cluster = Cluster(
                self.purger, settings.cluster, settings.roots, reactor, settings.max_line_length, self.lane
            )
            self.addService(self.cluster)
            served = self.cluster
        self.factory = PurgeFactory(
            served, reactor, settings.idle_timeout, settings.max_line_length, settings.max_connections
        )
        port = strports.service(with_backlog(settings.listen), self.factory, reactor=reactor)
        port.setName("purge-port")
        self.port = port
        if self.cluster is None:
            port.setServiceParent(self)  # else once the cluster has caught up (startService)

    def reconfigure(self, settings: PurgeSettings) -> list[str]:
        """Apply a re-read purge section (SIGHUP); the settings that need a restart (then nothing changed).

        Zones, modes, warming, idle_timeout, max_line_length and max_connections change in place;
        the port, the roots, the trash, the tag index's switch and headers, and the cluster do not.
        """
        old = self.settings
        fixed = ["listen", "roots", "trash_dir", "tags", "cluster"]
        needs = [f"purge.{name}" for name in fixed if getattr(old, name) != getattr(settings, name)]
        if needs:
            return needs
        purger = self.purger
        purger.set_zones(ZoneMap(settings.zones, self._policy))
        purger.mode = settings.mode
        if settings.warm.enabled:
            if self.warmer is None:
                self.warmer = Warmer(settings.warm, self._reactor, __version__)
                self.addService(self.warmer)
            self.warmer.settings = settings.warm
            purger.warm, purger.warm_limit = self.warmer.warm, settings.warm.max_entries
        else:
            purger.warm = None
        if self.tags is not None:
            self.tags.set_zones(settings.zones)
        factory = self.factory
        factory.idle_timeout, factory.max_line_length = settings.idle_timeout, settings.max_line_length
        factory.max_connections = settings.max_connections
        self._zones, self.settings = settings.zones, settings
        self._warn_unwarmable()
        return []

    def startService(self) -> None:
        limit = raise_open_files_limit_once(self.log)
        if limit is not None and self.factory.max_connections + FD_RESERVE > limit:
            self.log.warn(
                "purge.max_connections {max} leaves fewer than {reserve} of the {limit} open files for everything "
                "else; lower it, or raise the hard limit (systemd: LimitNOFILE=)",
                max=self.factory.max_connections, reserve=FD_RESERVE, limit=limit,
            )
        self._warn_unwarmable()
        self.trash.open()  # starts the trash's lanes when the trash is usable
        self.lane.start()
        for lane in [*self.scan_lanes, *self.tag_lanes, self.census_lane]:
            lane.start()
        if self.tags is not None:
            self.tags.start()
        MultiService.startService(self)
        if self.cluster is not None:
            # A node applies what it missed before it listens (or once Redis fails to answer at start).
            self.cluster.when_open().addCallback(lambda _: self.running and self.port.setServiceParent(self))

    def _warn_unwarmable(self) -> None:
        if self.warmer is None or not self.settings.warm.enabled:
            return
        for zone in self._zones:
            why = why_not_invertible(zone.key)
            if why is not None:
                self.log.warn("warming is off for zone {path}: {why}", path=zone.path, why=why)

    def stopService(self) -> Deferred[None]:
        d = maybeDeferred(super().stopService)
        d.addBoth(self._stop_threads)
        return d

    def _stop_threads(self, result: Any) -> Any:
        self.trash.close()  # the next start deletes what is left in the trash
        if self.tags is not None:
            self.tags.stop()
        for lane in [*self.scan_lanes, *self.tag_lanes, self.census_lane]:
            lane.abandon()
        return self.lane.stop().addCallback(lambda _: result)

