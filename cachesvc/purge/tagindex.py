"""One zone directory's tag index: which entries carry which tags, both ways. Thread-safe.

Entries are named by their path relative to the zone directory (``5/cd/<md5>``). Each distinct
tag is one string however many entries carry it (and is let go with the last of them). An index is *whole*
when its cold scan has finished and inotify has not overflowed since; until then tag purges in it
scan instead. During a cold scan, entries that events changed are not overwritten by what the
scan read earlier (the event is newer).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping

from cachesvc.purge.paths import PurgeTarget


class ZoneIndex:
    def __init__(self, target: PurgeTarget) -> None:
        self.target = target
        self.lock = threading.RLock()
        self.entries: dict[str, tuple[str, ...]] = {}
        self.by_tag: defaultdict[str, set[str]] = defaultdict(set)
        self.whole = False
        self.scans = 0  # cold scans started (a rescan after an overflow is the second)
        self._touched: set[str] | None = None  # paths events changed while a cold scan runs
        self._stale: set[str] = set()  # indexed before this scan and not found by it yet
        self._canonical: dict[str, str] = {}  # each distinct tag's one string
        self._lost = False  # the running scan cannot make the index whole

    @property
    def path(self) -> str:
        return self.target.path

    def put(self, name: str, tags: Iterable[str]) -> None:
        """*name* now carries *tags* (nothing: it is dropped). What an event saw."""
        with self.lock:
            self._set(name, tags)
            if self._touched is not None:
                self._touched.add(name)

    def drop(self, name: str) -> None:
        with self.lock:
            self._forget(name)
            if self._touched is not None:
                self._touched.add(name)

    def drop_dir(self, directory: str) -> int:
        """Forget every entry below *directory* (moved away or deleted); how many there were."""
        prefix = directory + "/"
        with self.lock:
            gone = [name for name in self.entries if name.startswith(prefix)]
            for name in gone:
                self.drop(name)
            return len(gone)

    def carrying(self, tags: Iterable[str], below: str = "") -> list[str]:
        """The entries that carry any of *tags* below the relative directory *below* (``""``: all)."""
        prefix = below + "/" if below else ""
        with self.lock:
            found: set[str] = set()
            for tag in tags:
                found |= self.by_tag.get(tag, set())
        return sorted(name for name in found if name.startswith(prefix))

    def begin_scan(self) -> None:
        with self.lock:
            self.whole = False
            self.scans += 1
            self._touched = set()
            self._lost = False
            self._stale = set(self.entries)

    def merge(self, scanned: Mapping[str, tuple[str, ...]]) -> None:
        """What a cold scan read (entries and their tags, none for entries without). Events since it began win."""
        with self.lock:
            touched = self._touched or set()
            for name, tags in scanned.items():
                self._stale.discard(name)
                if name not in touched:
                    self._set(name, tags)

    def end_scan(self) -> None:
        """The scan has read everything: entries it did not find are gone, and the index is whole."""
        with self.lock:
            for name in self._stale - (self._touched or set()):
                self._forget(name)
            self._stale = set()
            self._touched = None
            self.whole = not self._lost  # events lost during the scan: only a later scan makes it whole
            self._lost = False

    def overflowed(self) -> None:
        """inotify lost events (or a directory could not be watched): tag purges scan until a cold scan
        begun after this has finished."""
        with self.lock:
            self.whole = False
            if self._touched is not None:
                self._lost = True

    def carries(self, name: str, tags: frozenset[str]) -> bool:
        """Whether entry *name* carries any of *tags*, as far as the index knows."""
        with self.lock:
            return not tags.isdisjoint(self.entries.get(name, ()))

    def counts(self) -> tuple[int, int, int]:
        """(entries, distinct tags, (entry, tag) pairs)."""
        with self.lock:
            return len(self.entries), len(self.by_tag), sum(len(t) for t in self.entries.values())

    def _set(self, name: str, tags: Iterable[str]) -> None:
        self._forget(name)
        tags = tuple(tags)
        shared = tuple(map(self._canonical.setdefault, tags, tags))  # one string per distinct tag
        if not shared:
            return
        self.entries[name] = shared  # the same name object in both maps
        by_tag = self.by_tag
        for tag in shared:
            by_tag[tag].add(name)

    def _forget(self, name: str) -> None:
        tags = self.entries.pop(name, None)
        if not tags:
            return
        for tag in tags:
            holders = self.by_tag.get(tag)
            if holders is not None:
                holders.discard(name)
                if not holders:
                    del self.by_tag[tag]
                    self._canonical.pop(tag, None)
