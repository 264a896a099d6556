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
import functools
import itertools
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from cachesvc.purge.fstree import DIR_FLAGS, Visit, remove_tree_at
from cachesvc.purge.harvest import Harvest
from cachesvc.purge.paths import PurgeTarget
from cachesvc.purge.workers import WorkerThread

CATCH_UP_PARTS = 64
"""Parts waiting beyond which the normal-priority lanes help (four zone purges' worth with levels=1:2)."""


@dataclass
class _Slot:
    """One purge's directory in the trash, deleted as independent parts (its top-level entries)."""

    name: str
    label: str  # the purged path, for the log
    queued: float  # time.monotonic() when it was filled
    parts: int  # entries still to delete; the last one to finish removes the slot itself
    files: int = 0
    error: BaseException | None = None
    harvest: Harvest | None = None  # reads each file's key before it is deleted


class Trash:
    """The trash directory: takes renamed directories from the deleter's thread and deletes them on its own.

    Its lanes each run one job for as long as the trash is open: they take the parts of slots
    (a slot's top-level entries, 16 directories for a zone with ``levels=1:2``) from one queue in
    the order they were filled, and delete them with no trip through the reactor in between; the
    lane that finishes a slot's last part removes the slot and logs it.

    The *lanes* (low priority, nice 19) take every part. The *catch_up* lanes (normal priority)
    join only while more than ``CATCH_UP_PARTS`` parts wait: under a sustained purge load on a busy
    machine a nice-19 thread barely runs and the backlog grew without bound; several lanes also
    overlap the filesystem's latency (on an ext4 mounted with ``discard`` each ``rmdir`` waits
    milliseconds: one ``rm -rf`` of 3,700 small slots took 23 s, four side by side 2.6 s). What is
    left at a stop is counted in the log and deleted at the next start.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        roots: Sequence[str],
        lanes: WorkerThread | Sequence[WorkerThread],
        reactor: Any,
        catch_up: Sequence[WorkerThread] = (),
    ) -> None:
        self.path = path
        self.roots = roots
        # Low priority: background deletion does not compete with purges, unless it falls behind.
        self.lanes = [lanes] if isinstance(lanes, WorkerThread) else list(lanes)
        self.catch_up = list(catch_up)
        self._reactor = reactor
        self._fd: int | None = None
        self._usable: dict[str, bool] = {}
        self._slots = itertools.count()
        self._parts: deque[tuple[_Slot, str | None]] = deque()  # None: only the empty slot to remove
        self._backlog = 0  # slots filled and not yet deleted
        self._lock = threading.Lock()  # guards the three above and each _Slot's counts
        self._changed = threading.Condition(self._lock)
        self._closed = False

    @property
    def backlog(self) -> int:
        """Slots moved into the trash and not yet deleted."""
        return self._backlog

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
        st = os.fstat(self._fd)
        problem = _foreign(st.st_uid, st.st_mode)
        if problem:
            os.close(self._fd)
            self._fd = None
            self.log.error(
                "refusing trash {trash}: {problem}; purges delete in place before replying and nothing in it is "
                "touched. Remove it (the daemon creates its own, mode 0700) or chown it to the daemon's user "
                "and chmod 700 it.",
                trash=self.path, problem=problem,
            )
            return
        for root in self.roots:
            self._usable[root] = os.stat(root).st_dev == st.st_dev
            if not self._usable[root]:
                self.log.warn(
                    "{root} is not on the trash's filesystem ({trash}): purges there delete in place before replying",
                    root=root, trash=self.path,
                )
        leftovers = os.listdir(self._fd)  # names only; slots made from now on are the lanes'
        for lane in self.lanes + self.catch_up:
            lane.start()
        self.lanes[0].submit(lambda: self._clean_leftovers(leftovers)).addBoth(self._cleaned)
        for lane, waits_for in [(lane, 0) for lane in self.lanes] + [(lane, CATCH_UP_PARTS) for lane in self.catch_up]:
            lane.submit(functools.partial(self._drain, waits_for)).addErrback(
                lambda f: self.log.failure("background deletion in {trash} stopped", f, trash=self.path)
            )

    def close(self) -> None:
        """Stop without waiting: what is left in the trash is deleted at the next start."""
        if self._fd is not None:
            self.log.info(
                "trash {trash}: {slots} purged directories waiting for background deletion at stop"
                "{later}", trash=self.path, slots=self._backlog,
                later="; the next start deletes them" if self._backlog else "",
            )
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        for lane in self.lanes + self.catch_up:
            lane.abandon()

    def move_aside(self, target: PurgeTarget, parent_fd: int, name: str, harvest: Harvest | None = None) -> bool:
        """Blocking, on the deleter's thread. Move directory *name* (a zone root: its contents) into a new slot.

        Returns whether everything moved; the caller deletes what is left in place (an empty zone
        root: nothing, and no slot). Whatever moved is deleted by the trash in the background; a
        *harvest* records the keys of the files as they are deleted and is finished with the slot.
        """
        if self._fd is None or not self._usable.get(target.root):
            return False
        zone_fd: int | None = None
        entries = ["tree"]
        if target.is_zone_root:
            zone_fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
            entries = os.listdir(zone_fd)
            if not entries:
                os.close(zone_fd)
                return False  # already empty: nothing to move, no slot to delete
        slot = f"{time.time_ns():x}-{next(self._slots)}"
        try:
            os.mkdir(slot, 0o700, dir_fd=self._fd)
        except OSError as e:
            if zone_fd is not None:
                os.close(zone_fd)
            self._reactor.callFromThread(self.log.warn, "cannot use trash {trash}: {e}", trash=self.path, e=e)
            return False
        slot_fd = os.open(slot, DIR_FLAGS, dir_fd=self._fd)
        moved: list[str] = []
        try:
            if zone_fd is None:
                os.rename(name, "tree", src_dir_fd=parent_fd, dst_dir_fd=slot_fd)
                moved.append("tree")
                return True
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(entry, entry, src_dir_fd=zone_fd, dst_dir_fd=slot_fd)
                    moved.append(entry)
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
            if zone_fd is not None:
                os.close(zone_fd)
            os.close(slot_fd)
            # Even an empty slot is removed, by the same background lanes.
            record = _Slot(slot, target.path, time.monotonic(), max(1, len(moved)), harvest=harvest)
            self._queue(record, [*moved] or [None])

    def files_slot(self, target: PurgeTarget) -> FilesSlot | None:
        """Blocking: a new slot that single files below *target* can be moved into (a tag purge's many
        entries: a rename costs a third of an unlink on ext4); ``None`` if the trash cannot take them."""
        if self._fd is None or not self._usable.get(target.root):
            return None
        slot = f"{time.time_ns():x}-{next(self._slots)}"
        try:
            os.mkdir(slot, 0o700, dir_fd=self._fd)
            slot_fd = os.open(slot, DIR_FLAGS, dir_fd=self._fd)
        except OSError:
            return None
        try:
            os.mkdir("files", 0o700, dir_fd=slot_fd)
            files_fd = os.open("files", DIR_FLAGS, dir_fd=slot_fd)
        finally:
            os.close(slot_fd)
        return FilesSlot(self, _Slot(slot, target.path, time.monotonic(), 1), files_fd)

    def _queue(self, record: _Slot, parts: list[str | None]) -> None:
        with self._changed:
            self._backlog += 1
            self._parts.extend((record, part) for part in parts)
            self._changed.notify_all()

    def _drain(self, waits_for: int) -> None:
        """Blocking, each lane's one job: delete parts of slots as they come, until the trash closes.

        A lane with *waits_for* > 0 (a catch-up lane) takes parts only while more than that many wait.
        """
        fd = self._fd
        assert fd is not None, "drain before open"
        while True:
            with self._changed:
                while not self._closed and len(self._parts) <= waits_for:
                    self._changed.wait()
                if self._closed:
                    return
                slot, part = self._parts.popleft()
            files, error = 0, None
            try:
                if part is not None:
                    files = _remove_at(fd, slot.name, part, slot.harvest.visit if slot.harvest else None)
            except Exception as e:
                error = e
            with self._lock:
                slot.files += files
                slot.error = slot.error or error
                slot.parts -= 1
                last = slot.parts == 0
            if last:
                self._finish(fd, slot)

    def _finish(self, fd: int, slot: _Slot) -> None:
        try:
            os.rmdir(slot.name, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            slot.error = slot.error or e
        with self._lock:
            self._backlog -= 1
        if slot.harvest is not None and slot.error is None:
            slot.harvest.finish()
        if slot.error is not None:
            self._reactor.callFromThread(
                self.log.error, "background delete of {label!r} failed: {e}", label=slot.label, e=slot.error
            )
        else:
            self._reactor.callFromThread(
                self.log.info, "background delete of {label!r} finished: {files} files in {seconds:.2f} s",
                label=slot.label, files=slot.files, seconds=time.monotonic() - slot.queued,
            )

    def _clean_leftovers(self, names: list[str]) -> int:
        """Blocking: delete what a crash or a stop left in the trash (*names*, listed at open)."""
        fd = self._fd
        assert fd is not None
        files = 0
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                files += _remove(fd, name)
        return files

    def _cleaned(self, result: int | Failure) -> None:
        if isinstance(result, Failure):
            self.log.error("cleaning leftover trash in {trash} failed: {e}", trash=self.path, e=result.value)
        elif result:
            self.log.info("deleted {files} leftover files from trash {trash}", files=result, trash=self.path)


class FilesSlot:
    """A trash slot being filled with single files on one thread; ``close`` hands it to the lanes."""

    def __init__(self, trash: Trash, record: _Slot, fd: int) -> None:
        self._trash = trash
        self._record = record
        self._fd = fd
        self.moved = 0

    def move(self, dir_fd: int, name: str) -> bool:
        """Move file *name* of *dir_fd* into the slot (a symlink moves as a link); whether it was there."""
        try:
            os.rename(name, name, src_dir_fd=dir_fd, dst_dir_fd=self._fd)
        except FileNotFoundError:
            return False
        self.moved += 1
        return True

    def close(self) -> None:
        os.close(self._fd)
        self._trash._queue(self._record, ["files"])  # the lanes delete it, and the slot, in the background


def _remove_at(trash_fd: int, slot: str, part: str, visit: Visit | None = None) -> int:
    """Blocking: delete *part* of *slot* (a directory tree or a file); the files removed."""
    slot_fd = os.open(slot, DIR_FLAGS, dir_fd=trash_fd)
    try:
        return _remove(slot_fd, part, visit)
    except FileNotFoundError:
        return 0
    finally:
        os.close(slot_fd)


def _remove(parent_fd: int, name: str, visit: Visit | None = None) -> int:
    """Delete *name* in *parent_fd*: a directory tree (never followed if a symlink) or a file."""
    try:
        return remove_tree_at(parent_fd, name, visit)
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
    os.unlink(name, dir_fd=parent_fd)  # a file or a symlink: unlinked as it is
    return 1


def _foreign(uid: int, mode: int) -> str:
    """Why a trash directory with this owner and mode is not the daemon's own; empty if it is."""
    problems = []
    if uid != os.geteuid():
        problems.append(f"owned by uid {uid}, not the daemon's user (uid {os.geteuid()})")
    if mode & 0o022:
        problems.append(f"writable by group or others (mode {stat.S_IMODE(mode):o})")
    return " and ".join(problems)
