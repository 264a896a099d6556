"""Reading nginx cache files: the key stored after the binary header, and prefix scans of a zone.

An nginx cache file starts with a binary header whose size depends on the nginx build, then
``\\nKEY: <key>\\n``, the upstream's response headers and the body. Only the first few hundred
bytes are read per file.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

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

    Calls *progress* every *every* seconds during a long scan. Symlinks are skipped, never followed.
    """
    result = ScanResult()
    started = last = time.monotonic()
    top = open_dir(zone)
    if top is None:
        return result
    wanted = tuple(prefixes)
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
                            result.scanned += 1
                            key = read_key(fd, entry.name)
                            if key is not None and key.startswith(wanted):
                                try:
                                    os.unlink(entry.name, dir_fd=fd)
                                    result.deleted += 1
                                except FileNotFoundError:
                                    pass
            finally:
                os.close(fd)
            if progress is not None and time.monotonic() - last >= every:
                last = time.monotonic()
                progress(ScanResult(result.scanned, result.deleted, last - started))
    finally:
        for fd in stack:
            os.close(fd)
    result.seconds = time.monotonic() - started
    return result


class PrefixScanner:
    """Runs prefix scans on their own thread, so that a long scan never delays ordinary purges."""

    log = Logger()

    def __init__(self, lane: WorkerThread, reactor: Any) -> None:
        self._reactor = reactor
        self.lane = lane

    def scan(self, zone: PurgeTarget, prefixes: Sequence[bytes]) -> Deferred[ScanResult]:
        def progress(so_far: ScanResult) -> None:  # on the scan's thread
            self._reactor.callFromThread(
                self.log.info,
                "prefix purge in {zone}: {scanned} files scanned, {deleted} deleted, {seconds:.1f} s",
                zone=zone.path, scanned=so_far.scanned, deleted=so_far.deleted, seconds=so_far.seconds,
            )

        return self.lane.submit(lambda: purge_prefixes(zone, prefixes, progress))
