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

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

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
class ThreadPoolDeleter:
    """Runs :func:`delete_now` on *pool*, never on the reactor thread."""

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool) -> None:
        self._reactor = reactor
        self._pool = pool

    def delete(self, target: PurgeTarget) -> Deferred[Deleted]:
        return deferToThreadPool(self._reactor, self._pool, delete_now, target)


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
