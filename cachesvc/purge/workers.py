"""Worker threads for blocking filesystem work, and the one bridge from them to Deferreds.

Leaner than ``twisted.python.threadpool.ThreadPool`` for this job (no context capture, no team
coordinator), which is most of a small purge's latency. :meth:`WorkerThread.submit` is the only
way purge code hands work to a thread: it returns a Deferred that fires on the reactor thread.

On Linux a job wakes its thread through an ``eventfd``, whose write releases the GIL around the
system call: the woken thread finds the GIL free and runs at once. A ``queue.SimpleQueue`` wakes it
while the reactor still holds the GIL, so on a shared core the thread woke, found the GIL taken and
slept again: two more context switches and a stalled reactor per hand-off, about a tenth of a
one-connection purge's round trip.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")
_STOP = object()


class _EventInbox:
    """A FIFO whose ``put`` (any thread) wakes the thread blocked in ``get`` (one thread) by an eventfd."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()  # append and popleft are atomic: no lock needed
        self._fd = os.eventfd(0, os.EFD_CLOEXEC)
        weakref.finalize(self, os.close, self._fd)

    def put(self, item: Any) -> None:
        self._items.append(item)
        os.eventfd_write(self._fd, 1)  # a counter: it never blocks, and wakes the reader once for many puts

    def get(self) -> Any:
        items = self._items
        while not items:  # an item put after this check has written the eventfd, so the read returns
            os.eventfd_read(self._fd)
        return items.popleft()


def _inbox() -> _EventInbox | queue.SimpleQueue[Any]:
    return _EventInbox() if hasattr(os, "eventfd") else queue.SimpleQueue()


class WorkerThread:
    """Runs submitted callables one after another on one daemon thread, in submission order."""

    log = Logger()

    def __init__(self, reactor: Any, name: str, nice: int = 0) -> None:
        self._reactor = reactor
        self.name = name
        self._nice = nice
        self._abandoned = False
        self._jobs = _inbox()
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None

    @property
    def reactor(self) -> Any:
        """The reactor whose thread the Deferreds fire on."""
        return self._reactor

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def submit(self, job: Callable[[], T]) -> Deferred[T]:
        """Run *job* on the thread; the Deferred fires on the reactor thread with its result or exception.

        Call from the reactor thread. A job still queued when the thread is abandoned never runs,
        and its Deferred never fires: abandon only work that the next start redoes.
        """
        d: Deferred[T] = Deferred()
        self._jobs.put((job, d))
        return d

    def abandon(self) -> None:
        """Skip the jobs still queued; the running one finishes. For work that start-up redoes anyway."""
        self._abandoned = True
        self._jobs.put(_STOP)

    def stop(self) -> Deferred[None]:
        """Finish the queued jobs, then end the thread; fires on the reactor thread when it has."""
        if self._stopped is None:
            self._stopped = Deferred()
            if self._thread is None:
                self._stopped.callback(None)
            else:
                self._jobs.put(_STOP)
        return self._stopped

    def _loop(self) -> None:
        if self._nice:
            try:  # Linux: the priority of this thread alone
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
            except OSError as e:
                self._reactor.callFromThread(self.log.warn, "cannot lower {name}'s priority: {e}", name=self.name, e=e)
        while True:
            item = self._jobs.get()
            if self._abandoned:
                return
            if item is _STOP:
                stopped = self._stopped
                if stopped is not None:
                    self._reactor.callFromThread(stopped.callback, None)
                return
            job, d = item
            try:
                result = job()
            except BaseException:  # handed to the reactor thread, which decides
                self._reactor.callFromThread(d.errback, Failure())
            else:
                self._reactor.callFromThread(d.callback, result)
