"""Telling systemd how the daemon is doing (``Type=notify``), without libsystemd: one datagram per message.

The protocol (``sd_notify(3)``): newline-separated ``KEY=VALUE`` lines in one datagram to the
``AF_UNIX`` socket ``$NOTIFY_SOCKET`` names (a path, or ``@name`` for the abstract namespace).
Without ``NOTIFY_SOCKET`` nothing is sent and nothing is opened.

:class:`Readiness`, the last service of the tree, says:

- ``READY=1`` with ``STATUS=`` (one line: what listens where) once the whole tree has started:
  every port is listening by then (Twisted binds them in ``privilegedStartService``, before any
  ``startService``; a port that cannot listen stops start-up instead) and the purge service has
  opened its trash and handed what a previous run left there to its background thread. Deleting
  those leftovers, filling the tag index and reaching Redis go on after ``READY=1``: purges are
  answered meanwhile.
- ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` (when set, for this process) from a
  ``LoopingCall`` on the reactor: a reactor that stops turning stops the pings, and systemd
  restarts the daemon after ``WatchdogSec=``.
- ``RELOADING=1`` then ``READY=1`` around a SIGHUP's re-read of the config file.
- ``STOPPING=1`` as soon as the shutdown begins (this service stops first).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


class Notifier:
    """Sends ``sd_notify`` messages to *address* (``NOTIFY_SOCKET``'s value); does nothing when it is ``None``."""

    log = Logger()

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send *lines* (``READY=1``, ``STATUS=...``) as one datagram; whether it was sent."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(lines).encode("utf-8", "replace"), target)
        except OSError as e:
            if not self._failed:  # once: a watchdog ping every few seconds must not flood the log
                self._failed = True
                self.log.warn("cannot notify systemd at NOTIFY_SOCKET={address}: {error}", address=self.address,
                              error=e.strerror or str(e))
            return False
        self._failed = False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or ``None`` when the watchdog is off."""
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None  # meant for another process (a parent that exec'd us keeps its own)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def clean_status(text: str) -> str:
    """*text* as one ``STATUS=`` line: no newline may end the message early."""
    return " ".join(text.split())


class Readiness(Service):
    """``READY=1``, ``STATUS=``, ``WATCHDOG=1`` and ``STOPPING=1`` for the tree it closes; see the module."""

    log = Logger()
    name = "sd-notify"

    def __init__(
        self,
        notifier: Notifier,
        reactor: Any,
        status: str,
        watchdog: float | None = None,
        waits_for: Callable[[], Deferred[None]] | None = None,
    ) -> None:
        self.waits_for = waits_for  # e.g. a cluster node's catch-up: it listens only after that
        self.notifier = notifier
        self.reactor = reactor
        self.status = clean_status(status)
        self.watchdog = watchdog
        self.ready = False
        self._pings: LoopingCall | None = None

    def startService(self) -> None:
        Service.startService(self)
        if not self.notifier.enabled:
            return
        # After every startService of the tree (callWhenRunning runs after twistd's start-up
        # triggers; at once when the reactor already runs, where every sibling started before this one).
        self.reactor.callWhenRunning(self._started)

    def _started(self) -> None:
        if self.waits_for is not None:
            self.waits_for().addCallback(lambda _: self._announce())
        else:
            self._announce()

    def _announce(self) -> None:
        if not self.running:
            return
        self.ready = self.notifier.notify("READY=1", f"STATUS={self.status}", f"MAINPID={os.getpid()}")
        if self.watchdog is not None:
            self._pings = LoopingCall(self.notifier.notify, "WATCHDOG=1")
            self._pings.clock = self.reactor
            self._pings.start(self.watchdog, now=True)
            self.log.info("systemd watchdog: a ping every {seconds:g}s", seconds=self.watchdog)

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def reloaded(self, status: str | None = None) -> None:
        if status is not None:
            self.status = clean_status(status)
        self.notifier.notify("READY=1", f"STATUS={self.status}")

    def stopService(self) -> None:
        Service.stopService(self)
        if self._pings is not None and self._pings.running:
            self._pings.stop()
        self.notifier.notify("STOPPING=1", "STATUS=stopping")
        self.notifier.close()
