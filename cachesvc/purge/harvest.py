"""The keys of what one purge removed or marked, gathered on worker threads for warming afterwards.

A purge's filesystem work records each cache entry's key and the time nginx cached it; warming
wants the most recently cached first and at most ``limit`` of them, so only those are kept (a
heap: a site purge of 100,000 entries keeps 10,000 without sorting all of them).
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
from collections.abc import Callable
from typing import Any

from cachesvc.purge import cachefile

Dated = tuple[int, bytes]
"""(the time nginx cached the entry, its key)"""


class Harvest:
    """Thread-safe. ``record`` from any thread; ``finish`` once, when nothing more can be recorded.

    *done* is called on the reactor thread (through *reactor*'s ``callFromThread``) with the kept
    entries, most recently cached first, and the number recorded.
    """

    def __init__(self, limit: int, done: Callable[[list[Dated], int], None], reactor: Any) -> None:
        self.limit = limit
        self.seen = 0  # entries recorded, kept or not
        self._done = done
        self._reactor = reactor
        self._heap: list[tuple[int, int, bytes]] = []  # (date, order, key), the oldest on top
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._finished = False

    def record(self, date: int, key: bytes) -> None:
        item = (date, next(self._order), key)
        with self._lock:
            self.seen += 1
            if len(self._heap) < self.limit:
                heapq.heappush(self._heap, item)
            elif item > self._heap[0]:
                heapq.heapreplace(self._heap, item)

    def visit(self, dir_fd: int, name: str) -> None:
        """Blocking: record file *name* in *dir_fd* if it is a version 5 cache file (before it is deleted)."""
        try:
            fd = os.open(name, cachefile.READ_FLAGS, dir_fd=dir_fd)
        except OSError:
            return
        try:
            entry = cachefile.parse(cachefile.read_head(fd))
        except OSError:
            return
        finally:
            os.close(fd)
        if entry is not None and entry.key is not None:
            self.record(entry.date, entry.key)

    def entries(self) -> list[Dated]:
        """Most recently cached first."""
        with self._lock:
            return [(date, key) for date, _, key in sorted(self._heap, reverse=True)]

    def finish(self) -> None:
        """Hand the entries to *done*, once; from any thread."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._reactor.callFromThread(self._done, self.entries(), self.seen)


class Gathering:
    """The harvests of one purge, one per zone it touches: when all are in, the URLs to warm.

    Each harvest turns its keys into URLs with its zone's *maker* (``None`` for a key that is not
    a ``GET`` entry, or not one the zone's key template can turn back into a URL). *done* gets the
    URLs, most recently cached first, and how many entries were left out. Called on the reactor thread.
    """

    def __init__(self, limit: int, reactor: Any, done: Callable[[list[str], int], None]) -> None:
        self.limit = limit
        self._reactor = reactor
        self._done = done
        self._open = 0
        self._sealed = False
        self._found: list[tuple[int, str]] = []
        self._skipped = 0

    def harvest(self, maker: Callable[[str], str | None]) -> Harvest:
        self._open += 1
        return Harvest(self.limit, lambda entries, seen: self._collected(maker, entries, seen), self._reactor)

    def seal(self) -> None:
        """No more harvests: the purge has handed out all of them."""
        self._sealed = True
        self._maybe_done()

    def _collected(self, maker: Callable[[str], str | None], entries: list[Dated], seen: int) -> None:
        self._open -= 1
        self._skipped += seen - len(entries)
        for date, key in entries:
            try:
                url = maker(key.decode("utf-8"))
            except UnicodeDecodeError:
                url = None
            if url is None:
                self._skipped += 1
            else:
                self._found.append((date, url))
        self._maybe_done()

    def _maybe_done(self) -> None:
        if not self._sealed or self._open:
            return
        self._sealed = False  # once
        self._found.sort(key=lambda found: found[0], reverse=True)
        self._done([url for _, url in self._found], self._skipped)
