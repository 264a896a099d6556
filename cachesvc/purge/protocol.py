"""The SpinupWP cache daemon's wire protocol: a path and ``\\n`` in, ``Purge: Success\\n`` out.

Clients are strict: the PHP plugin does one ``fread(512)`` and matches ``^Purge:\\sSuccess``, so a
reply is always one ``write`` of the whole line, sent only when the purge has finished. Lines on
one connection are answered in order; a path still in the buffer when the peer closes (the Go CLI
sends no newline and never reads) is purged all the same.

No client can hold the reactor: a connection's lines are answered at most ``lines_per_turn`` per
reactor turn (the rest wait, and the connection is not read, until they are answered), at most
``max_unanswered`` lines wait at once (one more is answered ``Purge: Error`` and the connection
closes), replies a client does not read stop its processing (and after ``idle_timeout`` the
connection), a line must be complete within ``idle_timeout`` of its first byte, and connections
beyond ``max_connections`` are closed as they arrive. Refusals are logged through a
:class:`~cachesvc.purge.ratelimit.LogBudget`.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as WireProtocol
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from cachesvc.purge.ratelimit import LogBudget

SUCCESS = b"Purge: Success\n"
ERROR = b"Purge: Error\n"

LINES_PER_TURN = 64
"""Lines of one connection answered in one reactor turn; then it yields (about 1 ms of refusals)."""

MAX_UNANSWERED = 4096
"""Lines of one connection that may wait for their answer; the next one is refused and closes it."""

MAX_CONNECTIONS = 512


class IPurge(Protocol):
    def purge(self, raw: bytes) -> Deferred[bool]: ...


class _Transport(Protocol):
    """What a purge connection uses of its transport (TCP, UNIX, or a test's StringTransport)."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getPeer(self) -> IAddress: ...

    producer: object | None
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


class _Refusal(str):
    """A queue entry that answers ``Purge: Error`` and closes the connection; the text is the reason."""


@implementer(IPushProducer, IHalfCloseableProtocol)
class PurgeProtocol(WireProtocol):
    """One purge connection. It is the transport's producer of replies, and pauses the transport's reading."""

    log = Logger()
    factory: PurgeFactory

    def connectionMade(self) -> None:
        self.factory.opened += 1
        self._buffer = b""  # the incomplete line
        self._line_since: float | None = None  # when the incomplete line began (or the last answer, if later)
        self._queue: deque[bytes | _Refusal] = deque()  # complete lines not yet started, in order
        self._busy = False  # one of this connection's purges is running
        self._closing = False  # input is ignored from now on: a refusal is queued, or the peer is gone
        self._lost = False
        self._half_closed = False  # the client has sent all it will send
        self._reading_paused = False
        self._writes_blocked = False  # the client does not read its replies
        self._pumping = False
        self._next_turn: IDelayedCall | None = None
        self._timer: IDelayedCall | None = None  # at most one; it may fire early and look again (_timer_fired)
        self._timer_kind = ""  # which limit applies now ("": none)
        self._due = 0.0  # when that limit is reached
        self._transport().registerProducer(self, True)
        self._arm_timer()

    # --- input --------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        factory = self.factory
        new_line = not self._buffer
        self._buffer += data
        if b"\n" in data:
            new_line = True
            room = factory.max_unanswered - len(self._queue) - self._busy
            *lines, rest = self._buffer.split(b"\n", max(room, 0))
            self._buffer = rest
            for line in lines:
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > factory.max_line_length:
                    self._refuse(f"line longer than {factory.max_line_length} bytes")
                    break
                self._queue.append(line)
            else:
                if b"\n" in rest:
                    self._refuse(f"more than {factory.max_unanswered} lines waiting for their answer")
        if not self._closing and len(self._buffer) > factory.max_line_length + 1:  # one byte of slack for "\r"
            self._refuse(f"line longer than {factory.max_line_length} bytes")
        if self._closing or not self._buffer:
            self._line_since = None
        elif new_line:
            self._line_since = factory.clock.seconds()
        self._pump()

    def _refuse(self, reason: str) -> None:
        """Answer what came before, then ``Purge: Error``, then close; ignore everything after."""
        self._queue.append(_Refusal(reason))
        self._closing = True
        self._buffer = b""

    # --- answering, a bounded number per reactor turn ------------------------------------------------

    def _pump(self) -> None:
        if self._pumping:
            return  # a purge that finished at once: the loop below goes on
        self._pumping = True
        try:
            budget = self.factory.lines_per_turn
            while self._queue and not self._busy and not self._writes_blocked:
                if budget == 0:
                    if self._next_turn is None:
                        self._next_turn = self.factory.clock.callLater(0, self._turn)
                    break
                budget -= 1
                item = self._queue.popleft()
                if isinstance(item, _Refusal):
                    self._queue.clear()
                    self._close_refused(item)
                    break
                self._busy = True
                self.factory.purger.purge(item).addCallbacks(self._answered, self._broke)
        finally:
            self._pumping = False
        if self._half_closed and not self._queue and not self._busy:
            self._close()  # everything the client sent is answered
        self._flow()

    def _turn(self) -> None:
        self._next_turn = None
        self._pump()

    def _answered(self, ok: bool) -> None:
        self._busy = False
        self._reply(SUCCESS if ok else ERROR)
        if self._line_since is not None:  # an incomplete line's time starts when it can be read
            self._line_since = self.factory.clock.seconds()
        self._pump()

    def _broke(self, failure: Failure) -> None:
        self.log.failure("purge connection broke", failure)
        self._busy = False
        self._queue.clear()
        self._close(abort=True)

    def _close_refused(self, reason: str) -> None:
        self.factory.refusals.emit(
            LogLevel.warn, "purge request refused ({reason}), closing connection from {peer}",
            reason=reason, peer=_peer(self._transport().getPeer()),
        )
        self._reply(ERROR)
        self._close()

    def _reply(self, line: bytes) -> None:
        if not self._lost:
            self._transport().write(line)

    def _flow(self) -> None:
        """Read only while nothing waits; keep the timer in step with the state."""
        if not self._lost:
            hold = bool(self._queue) or self._writes_blocked or self._closing
            if hold != self._reading_paused:
                self._reading_paused = hold
                transport = self._transport()
                transport.pauseProducing() if hold else transport.resumeProducing()
        self._arm_timer()

    # --- the transport's producer: replies the client does not read -----------------------------------

    def pauseProducing(self) -> None:
        self._writes_blocked = True
        self._flow()

    def resumeProducing(self) -> None:
        self._writes_blocked = False
        self._pump()

    def stopProducing(self) -> None:
        """The connection is gone; :meth:`connectionLost` finishes what was sent."""

    # --- time limits -------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        """Work out which time limit applies now and when it is reached; keep one timer that is not late.

        Called at every change of state, so it does not cancel and reschedule: a timer that fires
        before the limit it was set for looks again (:meth:`_timer_fired`).
        """
        factory = self.factory
        now = factory.clock.seconds()
        kind, due = "", 0.0
        if self._lost or self._closing and not self._queue and not self._busy:
            kind = ""
        elif self._writes_blocked:
            if self._timer_kind == "unread":
                return  # counts from when the replies stopped being read
            kind, due = "unread", now + factory.idle_timeout
        elif self._busy or self._queue:
            kind = ""  # a long purge is not idleness
        elif self._line_since is not None:
            kind, due = "line", self._line_since + factory.idle_timeout
        else:
            kind, due = "idle", now + factory.idle_timeout
        self._timer_kind, self._due = kind, due
        timer = self._timer
        if not kind:
            if self._lost and timer is not None:
                self._timer = None
                timer.cancel()
        elif timer is None:
            self._timer = factory.clock.callLater(max(0.0, due - now), self._timer_fired)
        elif timer.getTime() > due:
            timer.reset(max(0.0, due - now))

    def _timer_fired(self) -> None:
        self._timer = None
        kind, due = self._timer_kind, self._due
        if not kind:
            return
        now = self.factory.clock.seconds()
        if due > now:
            self._timer = self.factory.clock.callLater(due - now, self._timer_fired)
        else:
            self._timed_out(kind)

    def _timed_out(self, kind: str) -> None:
        seconds = self.factory.idle_timeout
        what = {
            "idle": "idle for {seconds}s",
            "line": "a line still incomplete {seconds}s after its first byte",
            "unread": "replies unread for {seconds}s",
        }[kind]
        self.factory.timeouts.emit(LogLevel.info, "closing purge connection from {peer}: " + what,
                                   peer=_peer(self._transport().getPeer()), seconds=seconds)
        self._closing = True
        self._queue.clear()
        self._close(abort=kind == "unread")

    def _close(self, abort: bool = False) -> None:
        if self._lost:
            return
        self._closing = True
        self._reading_paused = True  # closing stops the reading for good; the transport is not touched again
        transport = self._transport()
        if transport.producer is not None:
            transport.unregisterProducer()  # else loseConnection waits for it
        if abort:
            transport.abortConnection()
        else:
            transport.loseConnection()

    def readConnectionLost(self) -> None:
        """The client closed its sending side after its lines (socat, ``nc -N``): answer them, then close."""
        if self._lost:
            return
        rest, self._buffer = self._buffer, b""
        if rest.endswith(b"\r"):
            rest = rest[:-1]
        if rest and not self._closing and len(rest) <= self.factory.max_line_length:
            self._queue.append(rest)
        self._line_since = None
        self._half_closed = True
        self._closing = True  # nothing more can arrive
        self._pump()

    def writeConnectionLost(self) -> None:
        """Our sending side is gone: nothing can be answered, so the connection is over."""
        self._close(abort=True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self.factory.opened -= 1
        rest, self._buffer = self._buffer, b""
        if rest.endswith(b"\r"):
            rest = rest[:-1]
        if rest and not self._closing and len(rest) <= self.factory.max_line_length:
            self._queue.append(rest)  # the Go CLI's path without newline: purged, nobody to answer
        self._closing = True
        self._writes_blocked = False
        self._pump()  # what was sent is still purged, in order, at the same pace

    def _transport(self) -> _Transport:
        assert self.transport is not None  # set by makeConnection, before connectionMade
        return cast(_Transport, self.transport)


class PurgeFactory(ServerFactory[PurgeProtocol]):
    protocol = PurgeProtocol
    noisy = False
    log = Logger()

    def __init__(
        self,
        purger: IPurge,
        clock: IReactorTime,
        idle_timeout: float,
        max_line_length: int,
        max_connections: int = MAX_CONNECTIONS,
        max_unanswered: int = MAX_UNANSWERED,
        lines_per_turn: int = LINES_PER_TURN,
    ) -> None:
        self.purger = purger
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_line_length = max_line_length
        self.max_connections = max_connections
        self.max_unanswered = max_unanswered
        self.lines_per_turn = lines_per_turn
        self.opened = 0  # connections open now
        self.refusals = LogBudget(self.log, clock, "purge requests refused by the protocol")
        self.timeouts = LogBudget(self.log, clock, "purge connections closed by a time limit")
        self.crowded = LogBudget(
            self.log, clock, f"purge connections refused (purge.max_connections {max_connections})"
        )

    def buildProtocol(self, addr: IAddress | None) -> PurgeProtocol | None:
        if self.opened >= self.max_connections:
            self.crowded.emit(
                LogLevel.warn, "refusing purge connection from {peer}: {open} open, purge.max_connections is {max}",
                peer=_peer(addr), open=self.opened, max=self.max_connections,
            )
            return None  # the port closes the socket at once
        return super().buildProtocol(addr)


def _peer(address: IAddress | None) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else str(getattr(address, "name", None) or "a local socket")

