"""Descriptor-relative filesystem walks that never follow a symlink (blocking; thread use only).

Every step is relative to an open directory descriptor and opened with ``O_NOFOLLOW``: a symlink
planted anywhere between a cache root and a target refuses the operation, and one swapped in during
a recursive delete is unlinked as a link, never descended into (the guarantee of Python's fd-based
``shutil.rmtree``, re-implemented here to count files and to share the walk with the scanner).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable

from cachesvc.purge.beneath import open_beneath
from cachesvc.purge.paths import PurgeTarget, Refused

Visit = Callable[[int, str], None]
"""Called with (directory fd, name) for each file just before it is unlinked (a harvest's ``visit``)."""

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class RootDirs:
    """The cache roots, each opened once for a batch of purges (on its thread) and closed by :meth:`close`."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def fd(self, root: str) -> int:
        fd = self._fds.get(root)
        if fd is None:
            fd = self._fds[root] = _open_root(root)
        return fd

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def _open_root(root: str) -> int:
    try:
        return os.open(root, DIR_FLAGS)  # a root swapped for a symlink since start-up is refused too
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(root):
            raise Refused(f"cache root {root} is a symlink") from None
        raise


_WALK = -1
"""What :func:`_descend` says when only the walk can tell (a symlink or a file on the way, no openat2)."""


def _descend(dir_fd: int, target: PurgeTarget) -> int | None:
    """The directory holding *target*'s last part, opened below *dir_fd* by one ``openat2``."""
    try:
        # Without O_NOFOLLOW: it turns a final symlink into ENOTDIR; RESOLVE_NO_SYMLINKS makes it ELOOP.
        below = open_beneath(dir_fd, "/".join(target.parts[:-1]), DIR_FLAGS & ~os.O_NOFOLLOW)
    except OSError as e:
        return None if e.errno == errno.ENOENT else _WALK
    return _WALK if below is None else below


def open_parent(target: PurgeTarget, roots: RootDirs | None = None) -> int | None:
    """Open the directory holding *target*'s last part; ``None`` if it does not exist.

    Raises :class:`Refused` if any component below the root is a symlink. The descent is one
    ``openat2`` where the system has it (from the root *roots* holds open, if given); otherwise,
    or to name the symlink it met, one component at a time.
    """
    deep = len(target.parts) > 1
    if deep and roots is not None:
        found = _descend(roots.fd(target.root), target)
        if found != _WALK:
            return found
    parent = _open_root(target.root)
    if deep and roots is None:
        found = _descend(parent, target)
        if found != _WALK:
            os.close(parent)
            return found
    for depth, name in enumerate(target.parts[:-1]):
        try:
            child = os.open(name, DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            os.close(parent)
            return None
        except OSError as e:
            symlink = e.errno == errno.ELOOP or _is_symlink(parent, name)
            os.close(parent)
            if symlink:
                raise Refused(f"symlink at {target.root}/{'/'.join(target.parts[: depth + 1])}") from None
            if e.errno == errno.ENOTDIR:
                return None  # a file where a directory would be: nothing below it
            raise
        os.close(parent)
        parent = child
    return parent


def open_dir(target: PurgeTarget) -> int | None:
    """Open *target* itself as a directory, refusing symlinks; ``None`` if it is absent or not a directory."""
    parent = open_parent(target)
    if parent is None:
        return None
    try:
        return os.open(target.parts[-1], DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        return None
    except OSError as e:
        # O_DIRECTORY | O_NOFOLLOW on a symlink is ENOTDIR on Linux, as for a plain file.
        if e.errno == errno.ELOOP or (e.errno == errno.ENOTDIR and _is_symlink(parent, target.parts[-1])):
            raise Refused(f"symlink at {target.path}") from None
        if e.errno == errno.ENOTDIR:
            return None
        raise
    finally:
        os.close(parent)


def remove_tree_at(parent_fd: int, name: str, visit: Visit | None = None) -> int:
    """Remove directory *name* in *parent_fd* and everything below it; return the files removed."""
    count = empty_dir_at(parent_fd, name, visit)
    os.rmdir(name, dir_fd=parent_fd)
    return count


def empty_dir_at(parent_fd: int, name: str, visit: Visit | None = None) -> int:
    """Remove everything inside directory *name* in *parent_fd*, keeping the directory itself."""
    fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    try:
        return empty_dir_fd(fd, visit)
    finally:
        os.close(fd)


def empty_dir_fd(fd: int, visit: Visit | None = None) -> int:
    """Remove everything inside the open directory *fd*; return the number of non-directories removed."""
    count = 0
    with os.scandir(fd) as entries:
        names = [(e.name, _is_dir(e)) for e in entries]
    for name, is_dir in names:
        if is_dir:
            try:
                count += remove_tree_at(fd, name, visit)
                continue
            except FileNotFoundError:
                continue
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                # Swapped for a symlink or a file since the listing: fall through and unlink it.
        if visit is not None and not is_dir:
            visit(fd, name)
        try:
            os.unlink(name, dir_fd=fd)
            count += 1
        except FileNotFoundError:
            pass
        except IsADirectoryError:  # replaced by a directory since the listing
            count += remove_tree_at(fd, name, visit)
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


MAX_OPEN_DIRS = 64


class DirCache:
    """Open directories below *top* by relative path, each opened without following a symlink.

    At most ``MAX_OPEN_DIRS`` at once (then all are closed and opened again as needed).
    """

    def __init__(self, top: PurgeTarget) -> None:
        self.top = top
        self._fds: dict[str, int | None] = {}

    def get(self, rel: str) -> int | None:
        if rel in self._fds:
            return self._fds[rel]
        if len(self._fds) >= MAX_OPEN_DIRS:
            self.close()  # a bounded number of descriptors, whatever the zone's size
        fd: int | None
        if not rel:
            try:
                fd = open_dir(self.top)
            except (Refused, OSError):
                fd = None
        else:
            parent_rel, _, name = rel.rpartition("/")
            parent = self.get(parent_rel)
            fd = None
            if parent is not None:
                with contextlib.suppress(OSError):
                    fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        self._fds[rel] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()
