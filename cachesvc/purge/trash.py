"""Constant-time purges of big directories: rename aside, reply, delete in the background.

A site purge renames the zone's top-level entries (16 directories with ``levels=1:2``) into a
private slot of the trash directory on the same filesystem. That takes microseconds whatever the
cache size, and afterwards nginx finds no file for any key (a MISS). The slot is deleted on a
low-priority thread; slots left by a crash or a stop are deleted at the next start.
The trash is never inside an nginx zone, whose cache loader would delete foreign files.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cachesvc.purge.fstree import DIR_FLAGS, empty_dir_fd, remove_tree_at
from cachesvc.purge.lane import WorkerThread


class Trash:
    log = Logger()

    def __init__(self, path: str, roots: list[str], reactor: Any) -> None:
        self.path = path
        self.roots = roots
        self.lane = WorkerThread(reactor, "cachesvc-trash", nice=19)
        self._reactor = reactor
        self._fd: int | None = None
        self._usable: dict[str, bool] = {}
        self._slots = itertools.count()

    def open(self) -> None:
        """Create the trash (mode 0700) and find the roots it can take renames from. Small and once."""
        try:
            try:
                os.mkdir(self.path, 0o700)
            except FileExistsError:
                pass
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
        self.lane.submit(self._clean_leftovers, self._cleaned)

    def close(self) -> None:
        """Stop without waiting: what is left in the trash is deleted at the next start."""
        self.lane.abandon()

    def move_aside(self, root: str, parent_fd: int, name: str, keep_dir: bool) -> tuple[str | None, bool]:
        """Blocking. Move directory *name* (or, with *keep_dir*, its contents) into a new slot.

        Returns ``(slot, complete)``: *slot* holds what moved (``None`` if nothing did) and
        *complete* says whether everything did; the caller deletes what is left in place.
        """
        if self._fd is None or not self._usable.get(root):
            return None, False
        slot = f"{time.time_ns():x}-{next(self._slots)}"
        try:
            os.mkdir(slot, 0o700, dir_fd=self._fd)
        except OSError as e:
            self._reactor.callFromThread(self.log.warn, "cannot use trash {trash}: {e}", trash=self.path, e=e)
            return None, False
        slot_fd = os.open(slot, DIR_FLAGS, dir_fd=self._fd)
        moved = 0
        try:
            if not keep_dir:
                os.rename(name, "tree", src_dir_fd=parent_fd, dst_dir_fd=slot_fd)
                return slot, True
            zone_fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
            try:
                for entry in os.listdir(zone_fd):
                    try:
                        os.rename(entry, entry, src_dir_fd=zone_fd, dst_dir_fd=slot_fd)
                        moved += 1
                    except FileNotFoundError:
                        pass
            finally:
                os.close(zone_fd)
            return slot, True
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            self._usable[root] = False
            self._reactor.callFromThread(
                self.log.warn, "{root}: rename into the trash crosses a mount; deleting in place from now on", root=root
            )
            return (slot if moved else None), False
        finally:
            os.close(slot_fd)

    def discard(self, slot: str, label: str) -> Deferred[int]:
        """Delete *slot* on the low-priority thread; fires with the number of files removed."""
        done: Deferred[int] = Deferred()
        started = time.monotonic()
        fd = self._fd

        def finished(ok: bool, result: Any) -> None:
            if ok:
                self.log.info(
                    "background delete of {label!r} finished: {files} files in {seconds:.2f} s",
                    label=label, files=result, seconds=time.monotonic() - started,
                )
                done.callback(result)
            else:
                self.log.error("background delete of {label!r} failed: {e}", label=label, e=result)
                done.errback(result)

        self.lane.submit(lambda: remove_tree_at(fd, slot), finished)  # type: ignore[arg-type]
        return done

    def _clean_leftovers(self) -> int:
        return empty_dir_fd(self._fd)  # type: ignore[arg-type]

    def _cleaned(self, ok: bool, result: Any) -> None:
        if not ok:
            self.log.error("cleaning leftover trash in {trash} failed: {e}", trash=self.path, e=result)
        elif result:
            self.log.info("deleted {files} leftover files from trash {trash}", files=result, trash=self.path)
