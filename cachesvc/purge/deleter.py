"""Deleting a purge target (blocking, on a worker thread), and batching requests onto that thread."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from cachesvc.purge.fstree import RootDirs, empty_dir_at, open_parent, remove_tree_at
from cachesvc.purge.harvest import Harvest
from cachesvc.purge.paths import PurgeTarget
from cachesvc.purge.trash import Trash
from cachesvc.purge.workers import WorkerThread


@dataclass(frozen=True)
class Deleted:
    """What a purge did: ``absent`` (nothing was there) or ``deleted``, and how many files went."""

    outcome: str
    files: int | None  # None: moved to the trash, which deletes it in the background


class IDeleter(Interface):
    """Removes a :class:`PurgeTarget` from disk. The seam tests and embedders swap."""

    def delete(target: PurgeTarget, harvest: Harvest | None) -> Deferred[Deleted]:
        """Fire with :class:`Deleted` once the target is gone; fail with :class:`Refused` or ``OSError``.

        A *harvest* records each cache file's key before it goes, and is finished once all are recorded.
        """


@implementer(IDeleter)
class BatchingDeleter:
    """Runs :func:`delete_now` on a worker thread, never on the reactor thread, one batch at a time.

    A purge asked for while the thread is idle goes at once (the thread wakes with the GIL free and
    usually answers before the reactor's turn ends); those asked for while a batch runs wait for it
    and then travel together, at the end of the turn in which it came back. Under load that is one
    thread hand-off and one reactor wake-up per batch instead of per purge (most of the cost of a
    small purge), and a single lane avoids the GIL contention of several threads doing tiny system
    calls side by side.
    """

    def __init__(
        self, lane: WorkerThread, delete: Callable[[PurgeTarget, Harvest | None, RootDirs], Deleted]
    ) -> None:
        self._lane = lane
        self._delete = delete
        self._waiting: list[tuple[PurgeTarget, Harvest | None, Deferred[Deleted]]] = []
        self._busy = False  # a batch is on the thread, or waiting purges go at the end of this turn

    def delete(self, target: PurgeTarget, harvest: Harvest | None = None) -> Deferred[Deleted]:
        d: Deferred[Deleted] = Deferred()
        self._waiting.append((target, harvest, d))
        if not self._busy:
            self._busy = True
            self._send()
        return d

    def _send(self) -> None:
        batch, self._waiting = self._waiting, []
        work = [(t, h) for t, h, _ in batch]
        done = self._lane.submit(lambda: self._run(work))
        done.addBoth(self._fire, batch)

    def _run(self, work: list[tuple[PurgeTarget, Harvest | None]]) -> list[Deleted | BaseException]:
        outcomes: list[Deleted | BaseException] = []
        roots = RootDirs()  # each root opened once for the batch
        try:
            for target, harvest in work:
                try:
                    outcomes.append(self._delete(target, harvest, roots))
                except Exception as e:
                    outcomes.append(e)
        finally:
            roots.close()
        return outcomes

    def _fire(
        self,
        outcomes: list[Deleted | BaseException] | Failure,
        batch: list[tuple[PurgeTarget, Harvest | None, Deferred[Deleted]]],
    ) -> None:
        # Still busy while firing: purges requested from these callbacks join the next batch.
        for i, (_, _, d) in enumerate(batch):
            # A Failure: _run itself broke, so fail them all.
            outcome = outcomes if isinstance(outcomes, Failure) else outcomes[i]
            if isinstance(outcome, (BaseException, Failure)):
                d.errback(outcome)
            else:
                d.callback(outcome)
        if self._waiting:
            self._lane.reactor.callLater(0, self._send)  # with whatever else this turn asks for
        else:
            self._busy = False


def delete_now(
    target: PurgeTarget, trash: Trash | None = None, harvest: Harvest | None = None, roots: RootDirs | None = None
) -> Deleted:
    """Delete *target* (blocking). A zone root is emptied and kept with its owner and mode.

    With a *trash*, directories are moved into it, which deletes them in the background;
    ``files`` is then unknown (``None``), and the trash finishes the *harvest* when it has read them.
    """
    deleted = _delete_now(target, trash, harvest, roots)
    if harvest is not None and deleted.files is not None:
        harvest.finish()
    return deleted


def _delete_now(target: PurgeTarget, trash: Trash | None, harvest: Harvest | None, roots: RootDirs | None) -> Deleted:
    parent = open_parent(target, roots)
    if parent is None:
        return Deleted("absent", 0)
    visit = harvest.visit if harvest is not None else None
    try:
        name = target.parts[-1]
        if visit is None:  # the common case in one system call: a file (or a link) goes, a directory says so
            try:
                os.unlink(name, dir_fd=parent)
                return Deleted("deleted", 1)
            except FileNotFoundError:
                return Deleted("absent", 0)
            except (IsADirectoryError, PermissionError):
                pass  # a directory (EISDIR; EPERM elsewhere), or not ours to delete: see below
        try:
            st = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            return Deleted("absent", 0)
        if not stat.S_ISDIR(st.st_mode):
            if visit is not None and stat.S_ISREG(st.st_mode):
                visit(parent, name)
            os.unlink(name, dir_fd=parent)  # a file, or a symlink removed as a link
            return Deleted("deleted", 1)
        if trash is not None and trash.move_aside(target, parent, name, harvest):
            return Deleted("deleted", None)
        if target.is_zone_root:
            return Deleted("deleted", empty_dir_at(parent, name, visit))
        try:
            return Deleted("deleted", remove_tree_at(parent, name, visit))
        except FileNotFoundError:
            return Deleted("deleted", 0)
    finally:
        os.close(parent)
