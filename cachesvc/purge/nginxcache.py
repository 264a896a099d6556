"""Walks of nginx cache directories: prefix purges and soft purges, fairly shared between zones.

A walk reads the first bytes of each file (the header and ``\\nKEY: <key>\\n``, see
:mod:`~cachesvc.purge.cachefile`) and, for each purge that waits on it, deletes or marks expired
the entries it names. Concurrent purges of one directory share a walk.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cachesvc.purge import cachefile
from cachesvc.purge.fstree import DIR_FLAGS, open_dir, open_parent
from cachesvc.purge.harvest import Harvest
from cachesvc.purge.paths import PurgeTarget, Refused
from cachesvc.purge.tags import read_tagged
from cachesvc.purge.workers import WorkerThread


def read_key(dir_fd: int, name: str) -> bytes | None:
    """The cache key of file *name* in *dir_fd*, or ``None`` if it is not an nginx cache file."""
    try:
        fd = os.open(name, cachefile.READ_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None  # vanished, a symlink, or unreadable: not ours to judge
    try:
        return cachefile.key_anywhere(cachefile.read_head(fd))
    except OSError:
        return None
    finally:
        os.close(fd)


@dataclass
class ScanResult:
    scanned: int = 0
    deleted: int = 0
    seconds: float = 0.0
    marked: int = 0  # soft: entries whose valid_sec was set in the past


@dataclass(frozen=True)
class WalkRequest:
    """What one purge asks of a walk: the entries whose key starts with *prefixes* (``None``: every file).

    ``hard`` deletes them; ``soft`` marks the version 5 cache files among them expired and deletes
    the rest (a soft purge never leaves content served as fresh). *harvest* collects their keys.
    """

    prefixes: tuple[bytes, ...] | None
    mode: str = "hard"
    harvest: Harvest | None = None
    tags: frozenset[str] | None = None  # only entries carrying one of these (read from *headers*)
    headers: tuple[bytes, ...] = ()

    def matches(self, key: bytes | None, carried: tuple[str, ...]) -> bool:
        if self.tags is not None and self.tags.isdisjoint(carried):
            return False
        return self.prefixes is None or (key is not None and key.startswith(self.prefixes))


def purge_prefixes(
    zone: PurgeTarget,
    prefixes: Sequence[bytes],
    progress: Callable[[ScanResult], None] | None = None,
    every: float = 2.0,
) -> ScanResult:
    """Blocking. Delete every cache file below *zone* whose key starts with one of *prefixes*."""
    return purge_prefix_groups(zone, [prefixes], progress, every)[0]


def purge_prefix_groups(
    zone: PurgeTarget,
    groups: Sequence[Sequence[bytes]],
    progress: Callable[[ScanResult], None] | None = None,
    every: float = 2.0,
) -> list[ScanResult]:
    """Blocking. One walk of *zone* for several hard prefix purges; a result per group."""
    return walk_tree(zone, [WalkRequest(tuple(g)) for g in groups], time.time(), progress, every)


def walk_tree(
    target: PurgeTarget,
    requests: Sequence[WalkRequest],
    now: float,
    progress: Callable[[ScanResult], None] | None = None,
    every: float = 2.0,
) -> list[ScanResult]:
    """Blocking. One walk of *target* (a directory, or a single file) for several requests; a result each.

    A file that a hard request matches is deleted once, and counted as deleted for every request
    it matches. Symlinks are never followed: one in a request for every file is unlinked as a link;
    a *target* that is a symlink (or lies behind one) is :class:`Refused`.
    """
    walker = _Walker(requests, now)
    started = last = time.monotonic()
    parent = open_parent(target)
    if parent is None:
        return walker.results(0.0)
    try:
        name = target.parts[-1]
        try:
            st = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            return walker.results(0.0)
        if stat.S_ISDIR(st.st_mode):
            top = open_dir(target)
        elif any(r.prefixes is not None or r.tags is not None for r in requests) and stat.S_ISLNK(st.st_mode):
            raise Refused(f"symlink at {target.path}")  # a prefix purge walks a zone: never through a link
        else:
            walker.file(parent, name, stat.S_ISREG(st.st_mode))
            return walker.results(time.monotonic() - started)
    finally:
        os.close(parent)
    if top is None:
        return walker.results(0.0)
    stack = [top]
    visit = walker.file
    try:
        while stack:
            fd = stack.pop()
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            with contextlib.suppress(OSError):
                                stack.append(os.open(entry.name, DIR_FLAGS, dir_fd=fd))
                        else:
                            visit(fd, entry.name, entry.is_file(follow_symlinks=False))
            finally:
                os.close(fd)
            if progress is not None and time.monotonic() - last >= every:
                last = time.monotonic()
                progress(ScanResult(walker.scanned, walker.deleted, last - started, walker.marked))
    finally:
        for fd in stack:
            os.close(fd)
    return walker.results(time.monotonic() - started)


class _Walker:
    """The per-file decisions of one walk, and its counts."""

    def __init__(self, requests: Sequence[WalkRequest], now: float) -> None:
        self.requests = list(requests)
        self.now = now
        self.scanned = self.deleted = self.marked = 0
        self._counts = [ScanResult() for _ in requests]
        self._everything = [r for r in requests if r.prefixes is None and r.tags is None]
        self._headers = tuple(dict.fromkeys(h for r in requests if r.tags is not None for h in r.headers))
        self._flags = cachefile.WRITE_FLAGS if any(r.mode == "soft" for r in requests) else cachefile.READ_FLAGS
        only = self.requests[0] if len(self.requests) == 1 else None
        if only is not None and only.mode == "soft" and only.prefixes is None and only.tags is None:
            self.file = self._soft_file  # type: ignore[method-assign]  # the site purge's loop, kept lean
            self._fresh_from = int(now)
            self._past = cachefile.VALID_SEC.pack(int(now) - cachefile.PAST)

    def results(self, seconds: float) -> list[ScanResult]:
        for result in self._counts:
            result.scanned, result.seconds = self.scanned, seconds
        return self._counts

    def file(self, dir_fd: int, name: str, regular: bool) -> None:
        if not regular:  # a symlink, fifo, socket or device: never opened
            if self._everything and cachefile.unlink_quietly(dir_fd, name):
                self._count_deleted(self._everything)
            return
        self.scanned += 1
        fd = cachefile.open_entry(dir_fd, name, self._flags)
        if fd is None:
            return
        if fd == -1:  # swapped for a symlink since the listing
            self.file(dir_fd, name, False)
            return
        try:
            try:
                head = cachefile.read_head(fd)
            except OSError:
                head = b""  # not a readable file (a fifo swapped in): no key, not a cache file
            entry = cachefile.parse(head)
            key = entry.key if entry is not None else cachefile.key_anywhere(head)
            carried = self._carried(fd, entry)
            matched = [r for r in self.requests if r.matches(key, carried)]
            if not matched:
                return
            hard = any(r.mode == "hard" for r in matched)
            valid = entry is not None and cachefile.ENTRY_NAME.fullmatch(name) is not None
            if not hard and valid:
                assert entry is not None
                if cachefile.is_fresh(entry, self.now):  # one already expired is left as it is
                    cachefile.expire(fd, self.now)
                    self.marked += 1
                    for r in matched:
                        self._counts[self.requests.index(r)].marked += 1
                    self._harvest(matched, entry, key)
                return
        finally:
            os.close(fd)
        if cachefile.unlink_quietly(dir_fd, name):
            self._count_deleted(matched)
            if entry is not None:
                self._harvest(matched, entry, key)

    def _soft_file(self, dir_fd: int, name: str, regular: bool) -> None:
        """:meth:`file` for one soft request of every file: the same decisions, with no work to spare."""
        if regular:
            try:
                fd = os.open(name, cachefile.WRITE_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                regular = False  # swapped for a symlink since the listing
        if not regular:
            if cachefile.unlink_quietly(dir_fd, name):
                self.deleted += 1
                self._counts[0].deleted += 1
            return
        self.scanned += 1
        try:
            try:
                head = os.pread(fd, cachefile.FIRST_READ, 0)
            except OSError:
                head = b""
            cache = head[:8] == cachefile.V5 and head[cachefile.KEY_AT] == cachefile.KEY_MARK
            if not cache or not cachefile.ENTRY_NAME.fullmatch(name):
                junk = True
            else:
                junk = False
                if int.from_bytes(head[8:16], "little", signed=True) >= self._fresh_from:
                    os.pwrite(fd, self._past, cachefile.VALID_SEC_OFFSET)
                    self.marked += 1
                    self._counts[0].marked += 1
                    harvest = self.requests[0].harvest
                    if harvest is not None:
                        entry = cachefile.parse(head)
                        if entry is not None and entry.key is not None:
                            harvest.record(entry.date, entry.key)
        finally:
            os.close(fd)
        if junk and cachefile.unlink_quietly(dir_fd, name):
            self.deleted += 1
            self._counts[0].deleted += 1

    def _carried(self, fd: int, entry: cachefile.Entry | None) -> tuple[str, ...]:
        """The tags of the open file, when a tag purge waits on this walk (only cache files carry tags)."""
        if not self._headers or entry is None:
            return ()
        try:
            tagged = read_tagged(fd, self._headers)
        except OSError:
            return ()
        return tagged.tags if tagged is not None else ()

    def _count_deleted(self, matched: Sequence[WalkRequest]) -> None:
        self.deleted += 1
        for r in matched:
            self._counts[self.requests.index(r)].deleted += 1

    @staticmethod
    def _harvest(matched: Sequence[WalkRequest], entry: cachefile.Entry, key: bytes | None) -> None:
        if key is None:
            return
        for r in matched:
            if r.harvest is not None:
                r.harvest.record(entry.date, key)


@dataclass
class _Walk:
    """The purges of one directory that wait together: one walk serves them all."""

    zone: PurgeTarget
    requests: list[tuple[WalkRequest, Deferred[ScanResult]]] = field(default_factory=list)


class PrefixScanner:
    """Runs walks (prefix purges, soft purges) on lanes of their own, fairly between zones.

    A long scan never delays ordinary purges (they have their own thread), and one busy zone never
    makes another wait behind it: a zone is walked by one lane at a time, the purges that arrive
    for it meanwhile wait together and share its next walk, and a free lane takes the zone that has
    waited longest. Twenty purges of one big zone are then at most two walks, and another zone's
    purge starts on the next free lane.
    """

    log = Logger()

    def __init__(self, lanes: WorkerThread | Sequence[WorkerThread], reactor: Any) -> None:
        self._reactor = reactor
        self.lanes = [lanes] if isinstance(lanes, WorkerThread) else list(lanes)
        self._idle = list(reversed(self.lanes))
        self._waiting: dict[PurgeTarget, _Walk] = {}  # in the order the zones began to wait
        self._walking: set[PurgeTarget] = set()
        self._now: Callable[[], float] = time.time if reactor is None else reactor.seconds

    def scan(
        self,
        zone: PurgeTarget,
        prefixes: Sequence[bytes] | None,
        mode: str = "hard",
        harvest: Harvest | None = None,
        tags: frozenset[str] | None = None,
        headers: tuple[bytes, ...] = (),
    ) -> Deferred[ScanResult]:
        """Purge the entries below *zone* whose key starts with one of *prefixes* (``None``: all of them)
        and, with *tags*, that carry one of them in one of the *headers*."""
        d: Deferred[ScanResult] = Deferred()
        walk = self._waiting.get(zone)
        if walk is None:
            walk = self._waiting[zone] = _Walk(zone)
        request = WalkRequest(None if prefixes is None else tuple(prefixes), mode, harvest, tags, headers)
        walk.requests.append((request, d))
        self._dispatch()
        return d

    def _dispatch(self) -> None:
        while self._idle:
            zone = next((z for z in self._waiting if z not in self._walking), None)
            if zone is None:
                return
            walk = self._waiting.pop(zone)
            lane = self._idle.pop()
            self._walking.add(zone)
            requests = [request for request, _ in walk.requests]
            done = lane.submit(functools.partial(walk_tree, zone, requests, self._now(), self._progress(zone)))
            done.addBoth(self._walked, lane, walk)

    def _progress(self, zone: PurgeTarget) -> Callable[[ScanResult], None]:
        def progress(so_far: ScanResult) -> None:  # on the scan's thread
            self._reactor.callFromThread(
                self.log.info,
                "purge walk in {zone}: {scanned} files scanned, {deleted} deleted, {marked} marked expired, "
                "{seconds:.1f} s", zone=zone.path, scanned=so_far.scanned, deleted=so_far.deleted,
                marked=so_far.marked, seconds=so_far.seconds,
            )

        return progress

    def _walked(self, results: list[ScanResult] | Failure, lane: WorkerThread, walk: _Walk) -> None:
        self._walking.discard(walk.zone)
        self._idle.append(lane)
        self._dispatch()
        for i, (_, d) in enumerate(walk.requests):
            if isinstance(results, Failure):
                d.errback(results)
            else:
                d.callback(results[i])
