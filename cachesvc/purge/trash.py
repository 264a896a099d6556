"""Constant-time purges of big directories: rename aside, reply, delete in the background.

A site purge renames the zone's top-level entries (16 directories with ``levels=1:2``) into a
private slot of the trash directory on the same filesystem. That takes microseconds whatever the
cache size, and afterwards nginx finds no file for any key (a MISS). The trash then deletes the
slot itself, on its own low-priority thread; slots left by a crash or a stop are deleted at the
next start.
The trash is never inside an nginx zone, whose cache loader would delete foreign files.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import time
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cachesvc.purge.fstree import DIR_FLAGS, empty_dir_fd, remove_tree_at
from cachesvc.purge.paths import PurgeTarget
from cachesvc.purge.workers import WorkerThread


class Trash:
    """The trash directory: takes renamed directories from the deleter's thread and deletes them on its own."""

    log = Logger()

    def __init__(self, path: str, roots: Sequence[str], lane: WorkerThread, reactor: Any) -> None:
        self.path = path
        self.roots = roots
        self.lane = lane  # low priority: background deletion never competes with purges
        self._reactor = reactor
        self._fd: int | None = None
        self._usable: dict[str, bool] = {}
        self._slots = itertools.count()

    def open(self) -> None:
        """Create the trash (mode 0700) and find the roots it can take renames from. Small and once."""
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.path, 0o700)
            self._fd = os.open(self.path, DIR_FLAGS)
        except OSError as e:
            self.log.warn(
                "cannot use trash {trash} ({e}); purges delete in place before replying, so site purges take "
                "as long as the deletion. Make it writable for the daemon's user, or set purge.trash_dir.",
                trash=self.path, e=e.strerror,
            )
            return
        dev = os.fstat(self._fd).st_dev
        for root in self.roots:
            self._usable[root] = os.stat(root).st_dev == dev
            if not self._usable[root]:
                self.log.warn(
                    "{root} is not on the trash's filesystem ({trash}): purges there delete in place before replying",
                    root=root, trash=self.path,
                )
        self.lane.start()
        self.lane.submit(self._clean_leftovers).addBoth(self._cleaned)

    def close(self) -> None:
        """Stop without waiting: what is left in the trash is deleted at the next start."""
        self.lane.abandon()

    def move_aside(self, target: PurgeTarget, parent_fd: int, name: str) -> bool:
        """Blocking, on the deleter's thread. Move directory *name* (a zone root: its contents) into a new slot.

        Returns whether everything moved; the caller deletes what is left in place. Whatever moved
        is deleted by the trash in the background.
        """
        if self._fd is None or not self._usable.get(target.root):
            return False
        slot = f"{time.time_ns():x}-{next(self._slots)}"
        try:
            os.mkdir(slot, 0o700, dir_fd=self._fd)
        except OSError as e:
            self._reactor.callFromThread(self.log.warn, "cannot use trash {trash}: {e}", trash=self.path, e=e)
            return False
        slot_fd = os.open(slot, DIR_FLAGS, dir_fd=self._fd)
        try:
            if not target.is_zone_root:
                os.rename(name, "tree", src_dir_fd=parent_fd, dst_dir_fd=slot_fd)
                return True
            zone_fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
            try:
                for entry in os.listdir(zone_fd):
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(entry, entry, src_dir_fd=zone_fd, dst_dir_fd=slot_fd)
            finally:
                os.close(zone_fd)
            return True
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            self._usable[target.root] = False
            self._reactor.callFromThread(
                self.log.warn, "{root}: rename into the trash crosses a mount; deleting in place from now on",
                root=target.root,
            )
            return False
        finally:
            os.close(slot_fd)
            # Even an empty slot is removed, by the same background job.
            self._reactor.callFromThread(self.discard, slot, target.path)

    def discard(self, slot: str, label: str) -> Deferred[int | None]:
        """Delete *slot* on the low-priority thread; fires with the files removed (``None``: failed, logged)."""
        started = time.monotonic()
        fd = self._fd
        assert fd is not None, "discard before open"

        def finished(result: int | Failure) -> int | None:
            if isinstance(result, Failure):
                self.log.error("background delete of {label!r} failed: {e}", label=label, e=result.value)
                return None
            self.log.info(
                    "background delete of {label!r} finished: {files} files in {seconds:.2f} s",
                    label=label, files=result, seconds=time.monotonic() - started,
                )
            return result

        return self.lane.submit(lambda: remove_tree_at(fd, slot)).addBoth(finished)

    def _clean_leftovers(self) -> int:
        assert self._fd is not None
        return empty_dir_fd(self._fd)

    def _cleaned(self, result: int | Failure) -> None:
        if isinstance(result, Failure):
            self.log.error("cleaning leftover trash in {trash} failed: {e}", trash=self.path, e=result.value)
        elif result:
            self.log.info("deleted {files} leftover files from trash {trash}", files=result, trash=self.path)
