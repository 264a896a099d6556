"""A single worker thread for blocking filesystem work, driven from the reactor thread.

Leaner than ``twisted.python.threadpool.ThreadPool`` for this job (no context capture, no team
coordinator), which is most of a small purge's latency. Results come back with ``callFromThread``.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

_STOP = object()


class WorkerThread:
    """Runs submitted callables one after another on one daemon thread, in submission order."""

    log = Logger()

    def __init__(self, reactor: Any, name: str, nice: int = 0) -> None:
        self._reactor = reactor
        self._name = name
        self._nice = nice
        self._abandoned = False
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], Any], done: Callable[[bool, Any], None]) -> None:
        """Run *job* on the thread; call ``done(ok, result_or_exception)`` on the reactor thread."""
        self._jobs.put((job, done))

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
                self._reactor.callFromThread(self.log.warn, "cannot lower {name}'s priority: {e}", name=self._name, e=e)
        while True:
            item = self._jobs.get()
            if self._abandoned:
                return
            if item is _STOP:
                self._reactor.callFromThread(self._stopped.callback, None)  # type: ignore[union-attr]
                return
            job, done = item
            try:
                result, ok = job(), True
            except BaseException as e:  # handed to the reactor thread, which decides
                result, ok = e, False
            self._reactor.callFromThread(done, ok, result)
