"""Redis with a deadline on every call, connections that come back after any failure, and Lua scripts by hash.

The pool is ours, not txredisapi's: txredisapi's own pool waits forever for a Redis that is down
(``reconnect=True``) and stops reconnecting for good once an ``AUTH`` or ``SELECT`` fails. Here each
of :attr:`RedisClient.poolsize` connections is opened with the injected reactor, authenticated and
given its database by this module, and opened again after every failure (refused, timed out, lost,
``AUTH`` or ``SELECT`` refused) with an exponential backoff of at most :attr:`RedisClient.max_retry`
seconds. Commands are pipelined on the first live connection (as txredisapi's pool did), so
replies come in the order of the requests; the others stand by. When Redis or the network closes
one, the idle ones are closed with it (a restart closes them all) and every one is opened again.
Only txredisapi's protocol (the RESP parser) is used, with replies as bytes (``charset=None``,
``convertNumbers=False``): queue members must come back exactly as stored.

Every call is bounded by ``timeout`` and fails with :class:`RedisUnavailable` saying why: at once
when Redis answers but refuses the connection (``Redis at 127.0.0.1:6379 refused AUTH: WRONGPASS
…``); at its deadline when no connection came up by then (``cannot connect to Redis at …: connection
refused``, ``lost the connection …``: a restart may be over within it) or the command was left
unanswered (its connection is then closed and opened again). Callers (API handlers, the
scheduler) answer or skip instead of hanging, and show that text.

Scripts are package files (``lua/*.lua``) sent with ``EVALSHA``; a Redis that does not know one
yet (new, restarted, flushed) answers ``NOSCRIPT`` and gets the text once with ``EVAL``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator
from importlib import resources
from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet import error as net
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, fail, inlineCallbacks, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from cachesvc.metrics import Metrics


class RedisUnavailable(Exception):
    """Redis cannot be reached, refused the connection's ``AUTH``/``SELECT``, or did not answer in time."""


class RedisError(Exception):
    """Redis answered with an error (``BUSY``, ``WRONGTYPE``, a script error…)."""


class _Refused(RedisUnavailable):
    """Redis answered a connection's ``AUTH`` or ``SELECT`` with an error: no use waiting for that one."""


class Script:
    """A Lua script of the package's ``lua/`` folder, read once, named by its SHA-1."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.text = resources.files("cachesvc.recache").joinpath("lua", f"{name}.lua").read_bytes()
        self.sha = hashlib.sha1(self.text).hexdigest()

    def __repr__(self) -> str:
        return f"<Script {self.name}>"


class _Given(Factory):
    """Hands the endpoint the one protocol instance made for this attempt, without a log line per connection."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._protocol


class _Slot:
    """One connection of the pool: the live one, the attempt under way, or the attempt scheduled next."""

    def __init__(self) -> None:
        self.protocol: Any = None  # a RedisProtocol that passed AUTH and SELECT
        self.dropped: Any = None  # the protocol this client closed, until its connectionLost
        self.up_since = 0.0
        self.attempt: Deferred[Any] | None = None
        self.retry: IDelayedCall | None = None
        self.failures = 0  # consecutive failed attempts: the backoff's exponent


class RedisClient(Service):
    """The one connection pool to Redis; opened on start (or on the first call), closed when the service stops."""

    log = Logger()
    name = "redis"
    poolsize = 4
    first_retry = 0.2
    """Seconds before the first attempt after a failure; doubled after each further one."""
    max_retry = 3.0
    """The backoff's cap: a Redis that is down, or refuses the password, is tried again this often."""

    def __init__(
        self, addr: str, password: str, db: int, reactor: Any, timeout: float = 3.0, metrics: Metrics | None = None
    ) -> None:
        host, _, port = addr.rpartition(":")
        self._metrics = metrics
        self.addr = addr
        self.timeout = timeout
        self._reactor = reactor
        self._host = host or "localhost"
        self._port = int(port or 6379)
        self._password = password or None
        self._db = db
        self._slots = [_Slot() for _ in range(self.poolsize)]
        self._waiting: list[Deferred[Any]] = []
        self._opened = False
        self._closed = False
        self.reason: str | None = None
        """Why the last attempt to open a connection failed; None once one succeeds."""
        self._refused = False  # that attempt reached Redis, which refused its AUTH or SELECT

    # --- calls ---------------------------------------------------------------------------------

    def call(self, command: str, *args: Any) -> Deferred[Any]:
        d = self._connection()
        d.addCallback(self._send, command, args)
        return self._bounded(d, command)

    def run(self, script: Script, keys: list[Any], args: list[Any]) -> Deferred[Any]:
        """Run *script* with *keys* and *args*; one round trip, two the first time a Redis sees it."""
        d = self.call("EVALSHA", script.sha, len(keys), *keys, *args)

        def unknown(failure: Failure) -> Any:
            failure.trap(RedisError)
            if not str(failure.value).startswith("NOSCRIPT"):
                return failure
            return self.call("EVAL", script.text, len(keys), *keys, *args)

        d.addErrback(unknown)
        return d

    def _connection(self) -> Deferred[Any]:
        """A live connection now, or the next one to come up; at once why not, when Redis refuses them."""
        self._open()
        for slot in self._slots:
            # The first live one, as txredisapi's pool did: commands pipelined on one connection are
            # answered in the order they were sent, so no reply is seen after a failure that came later
            # (the others stand by, for a connection lost alone).
            if slot.protocol is not None and slot.protocol.connected:
                return succeed(slot.protocol)
        if self._closed:
            return fail(RedisUnavailable(f"the client of Redis at {self.addr} is closed"))
        if self._refused and self.reason is not None:
            return fail(RedisUnavailable(self.reason))

        def give_up(d: Deferred[Any]) -> None:
            self._waiting.remove(d)
            nothing = f"no connection to Redis at {self.addr} within {self.timeout:g}s"
            d.errback(RedisUnavailable(self.reason or nothing))

        waiter: Deferred[Any] = Deferred(give_up)
        self._waiting.append(waiter)
        return waiter

    def _send(self, protocol: Any, command: str, args: tuple[Any, ...]) -> Deferred[Any]:
        """*command* on *protocol*; cancelling it (the deadline) closes the connection, whose replies are then lost."""

        def abandon(d: Deferred[Any]) -> None:
            self._drop(protocol)
            d.errback(RedisUnavailable(f"Redis at {self.addr} did not answer {command} within {self.timeout:g}s"))

        result: Deferred[Any] = Deferred(abandon)

        def settle(reply: Any) -> None:
            if not result.called:
                result.callback(reply)  # a Failure errbacks

        try:
            reply: Deferred[Any] = protocol.execute_command(command, *args)
        except txredisapi.ConnectionError:
            return fail(RedisUnavailable(f"lost the connection to Redis at {self.addr}"))
        reply.addBoth(settle)
        return result

    def _bounded(self, d: Deferred[Any], command: str) -> Deferred[Any]:
        d.addTimeout(self.timeout, self._reactor)
        d.addErrback(self._translate, command)
        if self._metrics is not None:
            counter = self._metrics.redis_operations

            def ok(result: Any) -> Any:
                counter.labels(command.lower(), "ok").inc()
                return result

            def error(failure: Failure) -> Failure:
                counter.labels(command.lower(), "error").inc()
                return failure

            d.addCallbacks(ok, error)
        return d

    def _translate(self, failure: Failure, command: str) -> Failure:
        if failure.check(RedisUnavailable):
            return failure
        if failure.check(txredisapi.ResponseError, txredisapi.ScriptDoesNotExist):
            message = str(failure.value)
            if message.startswith("LOADING"):
                raise RedisUnavailable(f"Redis at {self.addr} is loading its dataset: {message}")
            raise RedisError(message)
        if failure.check(TimeoutError):
            raise RedisUnavailable(f"Redis at {self.addr} did not answer {command} within {self.timeout:g}s")
        if failure.check(txredisapi.ConnectionError, ConnectionError):
            raise RedisUnavailable(f"lost the connection to Redis at {self.addr} during {command}")
        return failure

    # --- connections ---------------------------------------------------------------------------

    def _open(self) -> None:
        if not self._opened and not self._closed:
            self._opened = True
            for slot in self._slots:
                self._connect(slot)

    def _connect(self, slot: _Slot) -> None:
        slot.retry = None
        protocol = txredisapi.RedisProtocol(charset=None, convertNumbers=False)
        protocol.callLater = self._reactor.callLater  # its class attribute is the global reactor's
        endpoint = HostnameEndpoint(self._reactor, self._host, self._port, timeout=self.timeout)
        d = endpoint.connect(_Given(protocol))
        d.addCallback(self._handshake)
        slot.attempt = d
        d.addCallbacks(self._up, self._failed, callbackArgs=(slot,), errbackArgs=(slot,))

    @inlineCallbacks
    def _handshake(self, protocol: Any) -> Generator[Deferred[Any], Any, Any]:
        """``AUTH`` (when there is a password) and ``SELECT``, each bounded; any failure closes the connection."""
        steps: list[tuple[str, tuple[Any, ...], str]] = [("SELECT", (self._db,), f"SELECT {self._db}")]
        if self._password is not None:
            steps.insert(0, ("AUTH", (self._password,), "AUTH"))
        for command, args, shown in steps:
            d = self._send(protocol, command, args)
            d.addTimeout(self.timeout, self._reactor)
            try:
                yield d
            except txredisapi.ResponseError as e:
                protocol.transport.abortConnection()
                raise _Refused(f"Redis at {self.addr} refused {shown}: {e}") from None
            except txredisapi.ConnectionError:
                raise RedisUnavailable(f"Redis at {self.addr} closed the connection during {shown}") from None
        return protocol

    def _up(self, protocol: Any, slot: _Slot) -> None:
        slot.attempt = None
        if self._closed:
            protocol.transport.loseConnection()
            return
        slot.protocol = protocol
        slot.up_since = self._reactor.seconds()
        slot.failures = 0
        protocol.whenDisconnected().addCallback(lambda _: self._lost(slot, protocol))
        if self.reason is not None:
            self.log.info("Connected to Redis at {addr} again", addr=self.addr)
            self.reason = None
        self._refused = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(protocol)

    def _failed(self, failure: Failure, slot: _Slot) -> None:
        slot.attempt = None
        if self._closed:
            return
        slot.failures += 1
        self._retry_later(slot, self._describe(failure), refused=failure.check(_Refused) is not None)

    def _lost(self, slot: _Slot, protocol: Any) -> None:
        ours = slot.dropped is protocol
        if ours:
            slot.dropped = None
        if slot.protocol is protocol:
            slot.protocol = None
        if self._closed:
            return
        if ours:  # closed here (a command past its deadline, or with the one below): open it again at once
            self._connect(slot)
            return
        reason = f"lost the connection to Redis at {self.addr}"
        # Closed by Redis or the network: the others are most likely gone too (a restart, a kill). The
        # idle ones are put out of use now, rather than be sent commands that fail later, out of order.
        for other in self._slots:
            if other.protocol is not None and not other.protocol.replyQueue.waiting:
                self._drop(other.protocol)
        if self._reactor.seconds() - slot.up_since < self.max_retry:
            slot.failures += 1  # lost as soon as it was up: back off as after a failed attempt
            self._retry_later(slot, reason)
            return
        if self.reason is None:  # it had been up a while: open it again at once
            self.log.warn("Redis unavailable: {reason} (connecting again)", reason=reason)
            self.reason, self._refused = reason, False
        self._connect(slot)

    def _drop(self, protocol: Any) -> None:
        """Close *protocol*'s connection and take it out of use at once (its connectionLost comes a turn later)."""
        for slot in self._slots:
            if slot.protocol is protocol:
                slot.protocol = None
                slot.dropped = protocol
        protocol.transport.abortConnection()

    def _retry_later(self, slot: _Slot, reason: str, refused: bool = False) -> None:
        delay = min(self.max_retry, self.first_retry * 2 ** min(slot.failures - 1, 16))
        if reason != self.reason:
            self.log.warn("Redis unavailable: {reason} (connecting again in {delay:g}s, then at least every {cap:g}s)",
                          reason=reason, delay=delay, cap=self.max_retry)
        self.reason, self._refused = reason, refused
        slot.retry = self._reactor.callLater(delay, self._connect, slot)
        if refused:  # Redis answers, and says no: those waiting learn it now, not at their deadline
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.errback(RedisUnavailable(reason))

    def _describe(self, failure: Failure) -> str:
        if failure.check(RedisUnavailable):
            return str(failure.value)
        if failure.check(net.ConnectionRefusedError):
            what = "connection refused"
        elif failure.check(net.TimeoutError, TimeoutError):
            what = f"no connection within {self.timeout:g}s"
        elif failure.check(net.DNSLookupError):
            what = f"cannot resolve {self._host!r}"
        else:
            what = failure.getErrorMessage()
        return f"cannot connect to Redis at {self.addr}: {what}"

    # --- service -------------------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._open()

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        self._closed = True
        closing: list[Deferred[Any]] = []
        for slot in self._slots:
            if slot.retry is not None and slot.retry.active():
                slot.retry.cancel()
            slot.retry = None
            if slot.attempt is not None:
                slot.attempt.cancel()
            if slot.protocol is not None:
                closing.append(slot.protocol.whenDisconnected())
                slot.protocol.transport.loseConnection()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(RedisUnavailable(f"the client of Redis at {self.addr} is closed"))
        return DeferredList(closing).addCallback(lambda _: None)
