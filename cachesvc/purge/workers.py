"""Worker threads for blocking filesystem work, and the one bridge from them to Deferreds.

Leaner than ``twisted.python.threadpool.ThreadPool`` for this job (no context capture, no team
coordinator), which is most of a small purge's latency. :meth:`WorkerThread.submit` is the only
way purge code hands work to a thread: it returns a Deferred that fires on the reactor thread.

Each thread runs under Linux's ``SCHED_BATCH`` policy: the same share of the CPU as any other
thread, but waking it does not preempt the thread that woke it. Without it, a job submitted while
the reactor shares a core with its worker (a busy or a pinned machine) woke the worker at once, which
found the GIL held and slept again: two context switches and a stalled reactor per hand-off, about a
sixth of a one-connection purge's round trip. Now the worker runs when the reactor waits.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")
_STOP = object()


def _no_wakeup_preemption() -> None:
    """Put the calling thread under ``SCHED_BATCH`` where the system has it (Linux); else leave it be."""
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is not None:
        # A seccomp filter or a container may forbid it: the thread works all the same.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, batch, os.sched_param(0))  # 0: this thread, on Linux


class WorkerThread:
    """Runs submitted callables one after another on one daemon thread, in submission order."""

    log = Logger()

    def __init__(self, reactor: Any, name: str, nice: int = 0) -> None:
        self._reactor = reactor
        self.name = name
        self._nice = nice
        self._abandoned = False
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
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
        _no_wakeup_preemption()
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
