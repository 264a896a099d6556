"""Reading nginx cache files: the key stored after the binary header, and prefix scans of a zone.

An nginx cache file starts with a binary header whose size depends on the nginx build, then
``\\nKEY: <key>\\n``, the upstream's response headers and the body. Only the first few hundred
bytes are read per file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cachesvc.purge.fstree import DIR_FLAGS, open_dir
from cachesvc.purge.paths import PurgeTarget
from cachesvc.purge.workers import WorkerThread

KEY_MARK = b"\nKEY: "
FIRST_READ = 1024
MAX_HEADER = 64 * 1024
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def read_key(dir_fd: int, name: str) -> bytes | None:
    """The cache key of file *name* in *dir_fd*, or ``None`` if it is not an nginx cache file."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None  # vanished, a symlink, or unreadable: not ours to judge
    try:
        head = os.read(fd, FIRST_READ)
        start = head.find(KEY_MARK)
        if start < 0:
            return None
        start += len(KEY_MARK)
        end = head.find(b"\n", start)
        while end < 0 and len(head) < MAX_HEADER:
            more = os.read(fd, FIRST_READ)
            if not more:
                return None
            head += more
            end = head.find(b"\n", start)
        return head[start:end] if end >= 0 else None
    finally:
        os.close(fd)


@dataclass
class ScanResult:
    scanned: int = 0
    deleted: int = 0
    seconds: float = 0.0


def purge_prefixes(
    zone: PurgeTarget,
    prefixes: Sequence[bytes],
    progress: Callable[[ScanResult], None] | None = None,
    every: float = 2.0,
) -> ScanResult:
    """Blocking. Delete every cache file below *zone* whose key starts with one of *prefixes*.

    Calls *progress* every *every* seconds during a long scan. Symlinks are skipped, never followed;
    a zone that is a symlink (or lies behind one) is :class:`Refused`.
    """
    return purge_prefix_groups(zone, [prefixes], progress, every)[0]


def purge_prefix_groups(
    zone: PurgeTarget,
    groups: Sequence[Sequence[bytes]],
    progress: Callable[[ScanResult], None] | None = None,
    every: float = 2.0,
) -> list[ScanResult]:
    """Blocking. One walk of *zone* for several requests, each a group of prefixes; a result per group.

    A file matching any group is deleted once and counted as deleted for every group it matches.
    """
    scanned = deleted = 0
    started = last = time.monotonic()
    results = [ScanResult() for _ in groups]
    top = open_dir(zone)
    if top is None:
        return results
    wanted = [tuple(g) for g in groups]
    union = tuple(dict.fromkeys(p for g in wanted for p in g))
    single = results[0] if len(results) == 1 else None
    stack = [top]
    try:
        while stack:
            fd = stack.pop()
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            with contextlib.suppress(OSError):
                                stack.append(os.open(entry.name, DIR_FLAGS, dir_fd=fd))
                        elif entry.is_file(follow_symlinks=False):
                            scanned += 1
                            key = read_key(fd, entry.name)
                            if key is None or not key.startswith(union):
                                continue
                            try:
                                os.unlink(entry.name, dir_fd=fd)
                            except FileNotFoundError:
                                continue
                            deleted += 1
                            if single is not None:
                                single.deleted += 1
                            else:
                                for group, result in zip(wanted, results, strict=True):
                                    if key.startswith(group):
                                        result.deleted += 1
            finally:
                os.close(fd)
            if progress is not None and time.monotonic() - last >= every:
                last = time.monotonic()
                progress(ScanResult(scanned, deleted, last - started))
    finally:
        for fd in stack:
            os.close(fd)
    seconds = time.monotonic() - started
    for result in results:
        result.scanned, result.seconds = scanned, seconds
    return results


@dataclass
class _Walk:
    """The prefix purges of one zone that wait together: one walk serves them all."""

    zone: PurgeTarget
    requests: list[tuple[tuple[bytes, ...], Deferred[ScanResult]]] = field(default_factory=list)


class PrefixScanner:
    """Runs prefix scans on lanes of their own, fairly between zones.

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

    def scan(self, zone: PurgeTarget, prefixes: Sequence[bytes]) -> Deferred[ScanResult]:
        d: Deferred[ScanResult] = Deferred()
        walk = self._waiting.get(zone)
        if walk is None:
            walk = self._waiting[zone] = _Walk(zone)
        walk.requests.append((tuple(prefixes), d))
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
            groups = [prefixes for prefixes, _ in walk.requests]
            done = lane.submit(functools.partial(purge_prefix_groups, zone, groups, self._progress(zone)))
            done.addBoth(self._walked, lane, walk)

    def _progress(self, zone: PurgeTarget) -> Callable[[ScanResult], None]:
        def progress(so_far: ScanResult) -> None:  # on the scan's thread
            self._reactor.callFromThread(
                self.log.info,
                "prefix purge in {zone}: {scanned} files scanned, {deleted} deleted, {seconds:.1f} s",
                zone=zone.path, scanned=so_far.scanned, deleted=so_far.deleted, seconds=so_far.seconds,
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
