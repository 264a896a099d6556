"""A tag purge answered from an index: each candidate is re-read, then deleted or marked (blocking).

The index says which entries carried the tags when it last saw them; the file has the last word.
An entry replaced with other tags is corrected in the index and left alone, one that is gone is
forgotten, and the rest are purged: unlinked (hard) or given a ``valid_sec`` in the past (soft).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from cachesvc.purge import cachefile
from cachesvc.purge.fstree import DirCache
from cachesvc.purge.harvest import Harvest
from cachesvc.purge.nginxcache import ScanResult
from cachesvc.purge.tagindex import ZoneIndex
from cachesvc.purge.tags import carries, parse_tags, read_head
from cachesvc.purge.trash import Trash


def purge_carriers(
    index: ZoneIndex,
    names: Sequence[str],
    tags: frozenset[str],
    mode: str,
    harvest: Harvest | None,
    now: float,
    headers: tuple[bytes, ...],
    trash: Trash | None = None,
) -> ScanResult:
    """Purge the entries *names* of *index* that still carry one of *tags*; thread only.

    Hard purges move the files into a slot of *trash* (deleted in the background) when it can take
    them, else unlink them.
    """
    result = ScanResult(scanned=len(names))
    started = time.monotonic()
    dirs = DirCache(index.target)
    soft = mode == "soft"
    slot = trash.files_slot(index.target) if trash is not None and not soft and names else None
    wanted = frozenset(t.encode("utf-8", "surrogateescape") for t in tags)
    try:
        for name in names:
            rel, _, base = name.rpartition("/")
            dir_fd = dirs.get(rel)
            fd = cachefile.open_entry(dir_fd, base, cachefile.WRITE_FLAGS if soft else cachefile.READ_FLAGS) \
                if dir_fd is not None else None
            if fd is None or fd == -1:
                index.drop(name)  # replaced by a symlink, or removed behind our back
                continue
            try:
                head, entry = read_head(fd)
                if entry is None or not carries(head, entry, headers, wanted):
                    tagged = parse_tags(head, headers, entry) if entry is not None else None
                    index.put(name, tagged.tags if tagged is not None else ())  # replaced: what it says now
                    continue
                if harvest is not None and entry.key is not None:
                    harvest.record(entry.date, entry.key)
                if soft:
                    if cachefile.is_fresh(entry, now):
                        cachefile.expire(fd, now)
                        result.marked += 1
                    continue
            finally:
                os.close(fd)
            assert dir_fd is not None
            if slot.move(dir_fd, base) if slot is not None else cachefile.unlink_quietly(dir_fd, base):
                result.deleted += 1
            index.drop(name)
    finally:
        dirs.close()
        if slot is not None:
            slot.close()
    result.seconds = time.monotonic() - started
    return result

