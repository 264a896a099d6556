"""Deleting below a cache root without ever following a symlink (blocking; runs on a thread pool).

Every step is relative to an open directory descriptor and opened with ``O_NOFOLLOW``: a symlink
planted anywhere between the root and the target refuses the purge, and one swapped in during a
recursive delete is unlinked as a link, never descended into (the same guarantee as Python's
fd-based ``shutil.rmtree``, which this re-implements only to count the files it removes).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from cachesvc.purge.lane import WorkerThread
from cachesvc.purge.paths import PurgeTarget, Refused

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Deleted:
    """What a purge did: ``absent`` (nothing was there) or ``deleted``, and how many files went."""

    outcome: str
    files: int


class IDeleter(Interface):
    """Removes a :class:`PurgeTarget` from disk. The seam tests and embedders swap."""

    def delete(target: PurgeTarget) -> Deferred[Deleted]:
        """Fire with :class:`Deleted` once the target is gone; fail with :class:`Refused` or ``OSError``."""


@implementer(IDeleter)
class BatchingDeleter:
    """Runs :func:`delete_now` on a worker thread, never on the reactor thread, one batch at a time.

    A purge that arrives while the lane is idle goes at once; those that arrive while a batch is
    running wait and then travel together. Under load that is one thread handoff and one reactor
    wake-up per batch instead of per purge (most of the cost of a small purge), and a single lane
    avoids the GIL contention of several threads doing tiny syscalls side by side.
    """

    def __init__(self, lane: WorkerThread, delete: Callable[[PurgeTarget], Deleted] | None = None) -> None:
        self._lane = lane
        self._delete = delete or delete_now
        self._waiting: list[tuple[PurgeTarget, Deferred[Deleted]]] = []
        self._busy = False

    def delete(self, target: PurgeTarget) -> Deferred[Deleted]:
        d: Deferred[Deleted] = Deferred()
        self._waiting.append((target, d))
        if not self._busy:
            self._send()
        return d

    def _send(self) -> None:
        batch, self._waiting = self._waiting, []
        self._busy = True
        targets = [t for t, _ in batch]
        self._lane.submit(lambda: self._run(targets), lambda ok, outcomes: self._fire(batch, ok, outcomes))

    def _run(self, targets: list[PurgeTarget]) -> list[Deleted | BaseException]:
        outcomes: list[Deleted | BaseException] = []
        for target in targets:
            try:
                outcomes.append(self._delete(target))
            except Exception as e:
                outcomes.append(e)
        return outcomes

    def _fire(self, batch: list[tuple[PurgeTarget, Deferred[Deleted]]], ok: bool, outcomes: Any) -> None:
        # Still busy while firing: purges requested from these callbacks join the next batch.
        for i, (_, d) in enumerate(batch):
            outcome = outcomes[i] if ok else outcomes  # not ok: _run itself broke, fail them all
            if isinstance(outcome, (BaseException, Failure)):
                d.errback(outcome)
            else:
                d.callback(outcome)
        self._busy = False
        if self._waiting:
            self._send()


def delete_now(target: PurgeTarget) -> Deleted:
    """Delete *target* (blocking). A zone root is emptied and kept with its owner and mode."""
    parent = os.open(target.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, name in enumerate(target.parts[:-1]):
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                return Deleted("absent", 0)
            except OSError as e:
                if e.errno == errno.ELOOP or _is_symlink(parent, name):
                    raise Refused(f"symlink at {_prefix(target, depth)}") from None
                if e.errno == errno.ENOTDIR:
                    return Deleted("absent", 0)  # a file where a directory would be: nothing below it
                raise
            os.close(parent)
            parent = child
        name = target.parts[-1]
        try:
            st = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            return Deleted("absent", 0)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent)  # a file, or a symlink removed as a link
            return Deleted("deleted", 1)
        if target.is_zone_root:
            return Deleted("deleted", empty_dir_at(parent, name))
        return Deleted("deleted", remove_tree_at(parent, name))
    finally:
        os.close(parent)


def remove_tree_at(parent_fd: int, name: str) -> int:
    """Remove directory *name* in *parent_fd* and everything below it; return the files removed."""
    count = empty_dir_at(parent_fd, name)
    os.rmdir(name, dir_fd=parent_fd)
    return count


def empty_dir_at(parent_fd: int, name: str) -> int:
    """Remove everything inside directory *name* in *parent_fd*, keeping the directory itself."""
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        return empty_dir_fd(fd)
    finally:
        os.close(fd)


def empty_dir_fd(fd: int) -> int:
    """Remove everything inside the open directory *fd*; return the number of non-directories removed."""
    count = 0
    with os.scandir(fd) as entries:
        names = [(e.name, _is_dir(e)) for e in entries]
    for name, is_dir in names:
        if is_dir:
            try:
                count += remove_tree_at(fd, name)
                continue
            except FileNotFoundError:
                continue
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                # Swapped for a symlink or a file since the listing: fall through and unlink it.
        try:
            os.unlink(name, dir_fd=fd)
            count += 1
        except FileNotFoundError:
            pass
        except IsADirectoryError:  # replaced by a directory since the listing
            count += remove_tree_at(fd, name)
    return count


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _is_symlink(parent_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=parent_fd).st_mode)
    except OSError:
        return False


def _prefix(target: PurgeTarget, depth: int) -> str:
    return target.root + "/" + "/".join(target.parts[: depth + 1])
