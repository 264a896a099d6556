"""The SpinupWP cache daemon's wire protocol: a path and ``\\n`` in, ``Purge: Success\\n`` out.

Clients are strict: the PHP plugin does one ``fread(512)`` and matches ``^Purge:\\sSuccess``, so a
reply is always one ``write`` of the whole line, sent only when the purge has finished. Lines on
one connection are answered in order; a path still in the buffer when the peer closes (the Go CLI
sends no newline and never reads) is purged all the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

SUCCESS = b"Purge: Success\n"
ERROR = b"Purge: Error\n"


class IPurge(Protocol):
    def purge(self, raw: bytes) -> Deferred[bool]: ...


class PurgeProtocol(LineReceiver, TimeoutMixin):
    delimiter = b"\n"
    log = Logger()
    factory: PurgeFactory

    def connectionMade(self) -> None:
        # One byte of slack for the optional "\r" that lineReceived strips before measuring.
        self.MAX_LENGTH = self.factory.max_line_length + 1
        self._tail: Deferred[Any] = succeed(None)
        self._pending = 0
        self._closing = False
        self._lost = False
        self.setTimeout(self.factory.idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        LineReceiver.dataReceived(self, data)

    def lineReceived(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.factory.max_line_length:
            self.lineLengthExceeded(line)
            return
        self._enqueue(line, reply=True)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.log.warn(
            "purge request refused (line longer than {limit} bytes), closing connection",
            limit=self.factory.max_line_length,
        )
        self._closing = True
        self.clearLineBuffer()
        self._tail.addCallback(lambda _: self._reply(ERROR))
        self._tail.addCallback(lambda _: self._transport().loseConnection())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self.setTimeout(None)
        rest = self.clearLineBuffer()
        if rest.endswith(b"\r"):
            rest = rest[:-1]
        if rest and not self._closing and len(rest) <= self.factory.max_line_length:
            self._enqueue(rest, reply=False)

    def timeoutConnection(self) -> None:
        self.log.info("closing purge connection idle for {seconds}s", seconds=self.factory.idle_timeout)
        TimeoutMixin.timeoutConnection(self)

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """TimeoutMixin's timer, on the factory's clock instead of the global reactor."""
        return self.factory.clock.callLater(period, func)

    def _enqueue(self, line: bytes, reply: bool) -> None:
        """Run purges of one connection one after another, so replies keep the request order."""
        self._pending += 1
        self.setTimeout(None)  # a long purge is not idleness
        self._tail.addCallback(lambda _: self.factory.purger.purge(line))
        self._tail.addCallback(lambda ok: self._finished(ok, reply))
        self._tail.addErrback(lambda f: self.log.failure("purge connection broke", f))

    def _finished(self, ok: bool, reply: bool) -> None:
        self._pending -= 1
        if reply:
            self._reply(SUCCESS if ok else ERROR)
        if self._pending == 0 and not self._closing and not self._lost:
            self.setTimeout(self.factory.idle_timeout)

    def _reply(self, line: bytes) -> None:
        if not self._lost:
            self._transport().write(line)

    def _transport(self) -> ITransport:
        assert self.transport is not None  # set by makeConnection, before connectionMade
        return self.transport


class PurgeFactory(ServerFactory[PurgeProtocol]):
    protocol = PurgeProtocol
    noisy = False

    def __init__(self, purger: IPurge, clock: IReactorTime, idle_timeout: float, max_line_length: int) -> None:
        self.purger = purger
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_line_length = max_line_length
