"""The tag index of every zone, built by a cold scan and kept current with inotify; it answers tag purges.

Threads: the index lane applies inotify events and answers tag purges, in the order they came, so
an event read before a purge began is applied before the purge looks (a purge first drains the
inotify descriptor: every entry nginx renamed into place before the line arrived is seen). Cold
scans run on a lane of their own and merge into the live index directory by directory; while a
zone's scan is unfinished, or after inotify overflowed, its tag purges walk the zone instead
(exact, slower). Every directory is opened descriptor-relative without following symlinks, and
watched through ``/proc/self/fd``, so a watch is on the directory that was checked.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.inotify import (
    IN_CREATE,
    IN_DELETE,
    IN_IGNORED,
    IN_ISDIR,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
)
from twisted.logger import Logger, LogLevel
from twisted.python._inotify import INotifyError
from twisted.python.failure import Failure

from cachesvc.purge import cachefile
from cachesvc.purge.fstree import DIR_FLAGS, DirCache, open_dir
from cachesvc.purge.harvest import Harvest
from cachesvc.purge.nginxcache import ScanResult
from cachesvc.purge.notifier import Event, Notifier
from cachesvc.purge.paths import PathPolicy, PurgeTarget, Refused
from cachesvc.purge.ratelimit import LogBudget
from cachesvc.purge.tagindex import ZoneIndex
from cachesvc.purge.tagpurge import purge_carriers
from cachesvc.purge.tags import read_tagged
from cachesvc.purge.trash import Trash
from cachesvc.purge.workers import WorkerThread
from cachesvc.purge.zones import Zone

ZONE_MASK = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_ONLYDIR
"""Entries appear by rename (nginx writes a temp file, then renames it into place); files are not
watched for writes, so a soft purge's own rewrites cost no events."""
PARENT_MASK = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR


class TagIndex:
    """Every configured zone's tag index. ``start``/``stop`` on the reactor; ``purge`` answers tag purges."""

    log = Logger()

    def __init__(
        self,
        zones: Sequence[Zone],
        policy: PathPolicy,
        headers: tuple[bytes, ...],
        lane: WorkerThread,
        scan_lane: WorkerThread,
        reactor: Any,
        trash: Trash | None = None,
    ) -> None:
        self.zones = tuple(zones)
        self.policy = policy
        self.headers = headers
        self.lane = lane
        self.scan_lane = scan_lane
        self.trash = trash  # hard tag purges move their files there
        self._reactor = reactor
        self._notifier: Notifier | None = None
        self.indexes: dict[str, ZoneIndex] = {}
        self._wds: dict[int, tuple[ZoneIndex, str]] = {}
        self._parents: dict[int, Zone] = {}
        self._scanning: set[str] = set()
        self._rescan: set[str] = set()
        self._limits = LogBudget(self.log, reactor, "cache entries with more tags than are indexed")
        self._over_limits: set[tuple[str, str]] = set()
        self._lock = threading.Lock()  # the maps above, shared by the lanes
        self._zone_dirs = [_zone_dir_pattern(zone.path) for zone in self.zones]

    # --- the reactor's side ------------------------------------------------------------------------

    def start(self) -> None:
        self._notifier = Notifier(self._reactor, self._events)
        self._notifier.startReading()
        self.scan_lane.submit(self._discover).addErrback(self._crashed, "finding the zones to index")

    def stop(self) -> None:
        if self._notifier is not None:
            self._notifier.stopReading()
            self._notifier.loseConnection()
            self._notifier = None

    def set_zones(self, zones: Sequence[Zone]) -> None:
        """Index *zones* from now on: new zone directories get a cold scan; indexed ones stay as they are."""
        self.zones = tuple(zones)
        self._zone_dirs = [_zone_dir_pattern(zone.path) for zone in self.zones]
        if self._notifier is not None:
            self.scan_lane.submit(self._discover).addErrback(self._crashed, "finding the zones to index")

    def purge(
        self, scope: PurgeTarget, tags: frozenset[str], mode: str, harvest: Harvest | None
    ) -> Deferred[ScanResult | None]:
        """Purge what carries *tags* below *scope* from the index; ``None``: no whole index covers it, scan."""
        if self._notifier is not None:
            self._notifier.drain()  # every entry written before the line arrived, in the lane before us
        now = self._reactor.seconds()
        return self.lane.submit(lambda: self._purge(scope, tags, mode, harvest, now))

    def _events(self, events: list[Event]) -> None:
        self.lane.submit(lambda: self._apply(events)).addErrback(self._crashed, "applying inotify events")

    def _crashed(self, failure: Failure, what: str) -> None:
        self.log.failure("tag index: {what} failed", failure, what=what)

    # --- discovery and cold scans (scan lane) --------------------------------------------------------

    def _discover(self) -> None:
        for zone in self.zones:
            head, host, tail = zone.path.partition("{host}")
            if not host:
                self._index(zone.path)
                continue
            parent = head.rstrip("/")
            if not tail:
                self._watch_parent(zone, parent)
            with contextlib.suppress(OSError):
                for name in sorted(os.listdir(parent)):
                    if not name.startswith("."):
                        self._index(parent + "/" + name + tail)

    def _watch_parent(self, zone: Zone, parent: str) -> None:
        try:
            target = self.policy.target(parent.encode()) if parent not in self.policy.roots else None
            fd = open_dir(target) if target is not None else os.open(parent, DIR_FLAGS)
        except (Refused, OSError):
            return
        if fd is None:
            return
        try:
            with self._lock:
                wd = self._add_watch(fd, PARENT_MASK)
                if wd is not None:
                    self._parents[wd] = zone
        finally:
            os.close(fd)

    def _index(self, path: str) -> None:
        """Start indexing zone directory *path* (once), with a cold scan on the scan lane."""
        try:
            target = self.policy.target(path.encode())
        except Refused:
            return
        if path in self.indexes or not os.path.isdir(path) or os.path.islink(path):
            return
        with self._lock:
            if path in self.indexes:
                return
            index = self.indexes[path] = ZoneIndex(target)
        self._cold_scan(index)

    def _cold_scan(self, index: ZoneIndex) -> None:
        """From any thread: scan *index* on the scan lane; if one is running, once more after it."""
        self._reactor.callFromThread(self._start_scan, index)

    def _start_scan(self, index: ZoneIndex) -> None:
        if index.path in self._scanning:
            self._rescan.add(index.path)  # the running scan may have read before what was lost
            return
        self._scanning.add(index.path)
        self.scan_lane.submit(lambda: self._scan(index)).addErrback(self._crashed, f"the cold scan of {index.path}")

    def _scan(self, index: ZoneIndex) -> None:
        started = time.monotonic()
        index.begin_scan()
        try:
            top = open_dir(index.target)
        except (Refused, OSError):
            top = None
        pending = [("", top)] if top is not None else []
        try:
            while pending:
                rel, fd = pending.pop()
                try:
                    self._watch(index, rel, fd)
                    found: dict[str, tuple[str, ...]] = {}
                    with os.scandir(fd) as entries:
                        for entry in entries:
                            child = f"{rel}/{entry.name}" if rel else entry.name
                            if entry.is_dir(follow_symlinks=False):
                                with contextlib.suppress(OSError):
                                    pending.append((child, os.open(entry.name, DIR_FLAGS, dir_fd=fd)))
                            elif entry.is_file(follow_symlinks=False) and cachefile.ENTRY_NAME.fullmatch(entry.name):
                                found[child] = self._tags_at(fd, entry.name, index)
                    index.merge(found)
                finally:
                    os.close(fd)
        finally:
            for _, fd in pending:
                os.close(fd)
        index.end_scan()
        count, tags, pairs = index.counts()
        self._reactor.callFromThread(self._scanned, index, count, tags, pairs, time.monotonic() - started)

    def _scanned(self, index: ZoneIndex, entries: int, tags: int, pairs: int, seconds: float) -> None:
        self._scanning.discard(index.path)
        if index.path in self._rescan:
            self._rescan.discard(index.path)
            self._start_scan(index)
            return
        self.log.info(
            "tag index ready for {zone}: {entries} entries, {tags} tags ({pairs} entry-tag pairs) in {seconds:.2f} s",
            zone=index.path, entries=entries, tags=tags, pairs=pairs, seconds=seconds,
        )

    # --- watches ---------------------------------------------------------------------------------------

    def _add_watch(self, fd: int, mask: int) -> int | None:
        notifier = self._notifier
        if notifier is None:
            return None
        try:
            return notifier.add(f"/proc/self/fd/{fd}".encode(), mask)
        except INotifyError as e:
            self._reactor.callFromThread(
                self.log.warn, "tag index: cannot watch a directory ({e}); raise fs.inotify.max_user_watches "
                "if the zones have more directories than it allows. Tag purges there scan instead.", e=e,
            )
            return None

    def _watch(self, index: ZoneIndex, rel: str, fd: int) -> None:
        with self._lock:  # the watch and its record at once: its first event may be read at any moment
            wd = self._add_watch(fd, ZONE_MASK)
            if wd is not None:
                self._wds[wd] = (index, rel)
        if wd is None:
            index.overflowed()

    def _unwatch_below(self, index: ZoneIndex, rel: str) -> None:
        prefix = rel + "/"
        with self._lock:
            gone = [wd for wd, (i, r) in self._wds.items() if i is index and (r == rel or r.startswith(prefix))]
            for wd in gone:
                del self._wds[wd]
        for wd in gone:
            if self._notifier is not None:
                self._notifier.remove(wd)

    # --- events and purges (index lane) ------------------------------------------------------------------

    def _apply(self, events: list[Event]) -> None:
        opened: dict[ZoneIndex, DirCache] = {}
        try:
            for wd, mask, raw in events:
                if mask & IN_Q_OVERFLOW:
                    self._overflowed()
                    continue
                with self._lock:
                    if mask & IN_IGNORED:
                        self._wds.pop(wd, None)
                        continue
                    zone = self._parents.get(wd)
                    where = self._wds.get(wd)
                name = os.fsdecode(raw)
                if zone is not None:
                    if mask & IN_ISDIR and name and not name.startswith("."):
                        parent = zone.path.partition("{host}")[0].rstrip("/")
                        self._index(parent + "/" + name)
                    continue
                if where is None or not name:
                    continue
                index, rel = where
                dirs = opened.get(index) or opened.setdefault(index, DirCache(index.target))
                child = f"{rel}/{name}" if rel else name
                if mask & IN_ISDIR:
                    if mask & (IN_CREATE | IN_MOVED_TO):
                        self._add_dir(index, child, dirs)
                    else:
                        index.drop_dir(child)
                        self._unwatch_below(index, child)
                elif mask & IN_MOVED_TO:
                    if cachefile.ENTRY_NAME.fullmatch(name):
                        fd = dirs.get(rel)
                        index.put(child, self._tags_at(fd, name, index) if fd is not None else ())
                elif mask & (IN_DELETE | IN_MOVED_FROM):
                    index.drop(child)  # (a file's IN_CREATE comes before its content: only its rename counts)
        finally:
            for dirs in opened.values():
                dirs.close()

    def _add_dir(self, index: ZoneIndex, rel: str, dirs: DirCache) -> None:
        """A directory appeared in a zone: watch it, then read what is already in it (and below)."""
        fd = dirs.get(rel)
        if fd is None:
            return
        self._watch(index, rel, fd)
        with contextlib.suppress(OSError), os.scandir(fd) as entries:
            for entry in entries:
                child = f"{rel}/{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    self._add_dir(index, child, dirs)
                elif entry.is_file(follow_symlinks=False) and cachefile.ENTRY_NAME.fullmatch(entry.name):
                    index.put(child, self._tags_at(fd, entry.name, index))

    def _overflowed(self) -> None:
        self._reactor.callFromThread(
            self.log.warn, "tag index: inotify overflowed (events were lost); tag purges scan until the index is "
            "rebuilt. Raise fs.inotify.max_queued_events if this repeats.",
        )
        for index in list(self.indexes.values()):
            index.overflowed()
            self._cold_scan(index)

    def _tags_at(self, dir_fd: int, name: str, index: ZoneIndex) -> tuple[str, ...]:
        fd = cachefile.open_entry(dir_fd, name, cachefile.READ_FLAGS)
        if fd is None or fd == -1:
            return ()
        try:
            tagged = read_tagged(fd, self.headers)
        except OSError:
            return ()
        finally:
            os.close(fd)
        if tagged is None:
            return ()
        if tagged.dropped and self._first_time_over(index, name):
            self._reactor.callFromThread(
                self._limits.emit, LogLevel.warn,
                "tag index: {name} in {zone} carries more tags than are indexed (1,000 per entry, 1,024 bytes "
                "each); {dropped} ignored", name=name, zone=index.path, dropped=tagged.dropped,
            )
        return tagged.tags

    def _first_time_over(self, index: ZoneIndex, name: str) -> bool:
        """Whether the entry's tags over the limits have not been logged yet (remembered for 10,000 entries)."""
        key = (index.path, name)
        with self._lock:
            if key in self._over_limits:
                return False
            if len(self._over_limits) >= 10000:
                self._over_limits.clear()
            self._over_limits.add(key)
            return True

    def _purge(
        self, scope: PurgeTarget, tags: frozenset[str], mode: str, harvest: Harvest | None, now: float
    ) -> ScanResult | None:
        covering = self._covering(scope)
        if covering is None:
            if any(pattern.fullmatch(scope.path) for pattern in self._zone_dirs):
                self._index(scope.path)  # a zone directory that appeared unseen: the scan answers, then the index
            return None
        index, below = covering
        if not index.whole:
            return None
        names = index.carrying(tags, below)
        if below and not names and index.carries(below, tags):
            names = [below]  # the scope is one entry's file
        return purge_carriers(index, names, tags, mode, harvest, now, self.headers, self.trash)

    def _covering(self, scope: PurgeTarget) -> tuple[ZoneIndex, str] | None:
        path = scope.path
        for zone_path, index in list(self.indexes.items()):
            if path == zone_path:
                return index, ""
            if path.startswith(zone_path + "/"):
                return index, path[len(zone_path) + 1 :]
        return None

def _zone_dir_pattern(path: str) -> re.Pattern[str]:
    return re.compile("[^/.][^/]*".join(re.escape(part) for part in path.split("{host}")))
