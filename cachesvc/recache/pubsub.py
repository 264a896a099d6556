"""Keyspace notifications: the server's flags, and a pub/sub connection of its own with a deadline on every step.

:func:`ensure_flags` reads ``notify-keyspace-events`` and adds what registry discovery needs to
what is there, never removing a flag (``specs/redis-discovery.md``).

A subscribed connection can run nothing but (P)SUBSCRIBE and PING, so it is never one of
:class:`~cachesvc.recache.redisclient.RedisClient`'s pooled connections: :class:`RedisPubSub`
opens one with the same address, password and database. Each :meth:`RedisPubSub.connect` is one
attempt (txredisapi's factory started with ``startConnecting`` and ``reconnect`` off): connecting,
AUTH and SELECT end within the timeout or fail with the reason (a refused password included), and
the caller, :class:`~cachesvc.recache.discovery.Discovery`, owns the retries and their backoff,
so no failure, AUTH's either, stops the reconnecting for good.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Generator, Sequence
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from cachesvc.recache import keys
from cachesvc.recache.redisclient import RedisError, RedisUnavailable
from cachesvc.recache.store import Store

NEEDED_FLAGS = "K$"  # every SET of a key is announced on its keyspace channel
WANTED_FLAGS = "K$gx"  # and DEL, RENAME and expiry too (discovery's MGET re-read notices those anyway)
ALL_FLAGS = "g$lshzxetd"  # what the flag "A" stands for

log = Logger()

OnMessage = Callable[[bytes, bytes], None]
"""Called with (channel, message) for every published message (keyspace: channel = key, message = event)."""


def missing_flags(current: str, wanted: str) -> str:
    """The flags of *wanted* that ``notify-keyspace-events`` = *current* lacks (``A`` counted as its letters)."""
    have = set(current) | (set(ALL_FLAGS) if "A" in current else set())
    return "".join(f for f in wanted if f not in have)


@inlineCallbacks
def ensure_flags(store: Store) -> Generator[Deferred[Any], Any, tuple[bool | None, str]]:
    """(True, flags) with notifications on, (False, why) if they are off and may not be set, (None, why)
    where CONFIG is refused (a managed Redis: the flags may still be on; only a probe can tell)."""
    try:
        current = yield store.notify_flags()
    except RedisError as e:
        return None, f"CONFIG GET notify-keyspace-events refused ({e})"
    missing = missing_flags(current, WANTED_FLAGS)
    if not missing:
        return True, f"notify-keyspace-events={current}"
    try:
        yield store.set_notify_flags(current + missing)
    except RedisError as e:
        if missing_flags(current, NEEDED_FLAGS):
            return False, f"notify-keyspace-events is {current!r} and CONFIG SET refused ({e})"
        return True, f"notify-keyspace-events={current}"
    log.info("added {missing} to notify-keyspace-events (was {current!r})", missing=missing, current=current)
    return True, f"notify-keyspace-events={current + missing}"


class Probe:
    """Where CONFIG is refused, whether notifications flow: write a short-lived key, wait for its announcement."""

    def __init__(self) -> None:
        self._waiting: tuple[bytes, Deferred[None]] | None = None

    def heard(self, key: bytes) -> None:
        """A keyspace message about *key* arrived (``keys.PROBE_PREFIX`` + token)."""
        if self._waiting is not None and self._waiting[0] == key and not self._waiting[1].called:
            self._waiting[1].callback(None)

    @inlineCallbacks
    def run(self, store: Store, clock: Any, timeout: float) -> Generator[Deferred[Any], Any, bool]:
        """True if the probe key's notification arrived within *timeout* (the channel is subscribed)."""
        name = keys.PROBE_PREFIX + secrets.token_hex(8)
        seen: Deferred[None] = Deferred()
        self._waiting = (name.encode(), seen)
        try:
            yield store.write_probe(name, 10_000)
            seen.addTimeout(timeout, clock)
            yield seen
        except (TimeoutError, RedisError):
            return False
        finally:
            self._waiting = None
        return True


class IPubSubLink(Interface):
    """One live subscriber connection."""

    lost: Deferred[None] = Attribute("Fires once, when the connection is gone (closed by either side)")

    def psubscribe(patterns: Sequence[str]) -> Deferred[None]:
        """Subscribe to channel *patterns*; fires once the server has registered every one of them."""

    def ping() -> Deferred[None]:
        """Fires when the server answered; fails with RedisUnavailable if it did not in time."""

    def close() -> Deferred[None]:
        """Drop the connection (``lost`` fires)."""


class IPubSub(Interface):
    """Opens subscriber connections: the seam the discovery tests swap."""

    def connect(on_message: OnMessage) -> Deferred[IPubSubLink]:
        """One attempt; fails with RedisUnavailable (its text says why) when it cannot be had in time."""


class _Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]  # txredisapi has no types
    on_message: OnMessage

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.on_message(channel, message)


class _Factory(txredisapi.SubscriberFactory):  # type: ignore[misc]
    protocol = _Subscriber
    reconnect = False  # one attempt per factory: the caller retries, with its own backoff

    def __init__(self, password: str, db: int, timeout: float, on_message: OnMessage) -> None:
        super().__init__()
        self.password = password or None
        self.dbid = db
        self.charset = None  # channel names (= keys) come back as bytes
        self.convertNumbers = False
        self.replyTimeout = timeout  # AUTH, SELECT and PING: no answer in time drops the connection
        self.on_message = on_message
        self.ready: Deferred[_Subscriber] = Deferred()

    def buildProtocol(self, addr: Any) -> _Subscriber:
        protocol: _Subscriber = super().buildProtocol(addr)
        protocol.on_message = self.on_message
        protocol.whenConnected().addCallback(self._ready)
        return protocol

    def _ready(self, protocol: _Subscriber) -> None:
        if not self.ready.called:
            self.ready.callback(protocol)

    def connectionError(self, why: str) -> None:
        # txredisapi's way of saying the attempt failed: refused, timed out, AUTH or SELECT refused.
        if not self.ready.called:
            self.ready.errback(RedisUnavailable(why))


@implementer(IPubSubLink)
class PubSubLink:
    def __init__(self, protocol: _Subscriber, factory: _Factory, clock: Any, timeout: float, addr: str) -> None:
        self._protocol = protocol
        self._factory = factory
        self._clock = clock
        self._timeout = timeout
        self._addr = addr
        self.lost: Deferred[None] = protocol.whenDisconnected()
        self.lost.addCallback(lambda _: None)

    def _bounded(self, d: Deferred[Any], what: str) -> Deferred[None]:
        def failed(failure: Failure) -> None:
            self._protocol.transport.abortConnection()
            raise RedisUnavailable(f"Redis at {self._addr} did not answer {what} within {self._timeout:g}s"
                                   if failure.check(TimeoutError, txredisapi.TimeoutError)
                                   else f"{what} on the pub/sub connection failed: {failure.getErrorMessage()}")

        d.addTimeout(self._timeout, self._clock)
        d.addCallbacks(lambda _: None, failed)
        return d

    def psubscribe(self, patterns: Sequence[str]) -> Deferred[None]:
        try:
            d = self._protocol.psubscribe(list(patterns))
        except txredisapi.ConnectionError as e:
            raise RedisUnavailable(str(e)) from e
        return self._bounded(d, "PSUBSCRIBE")

    def ping(self) -> Deferred[None]:
        try:
            d = self._protocol.execute_command("PING")
        except txredisapi.ConnectionError as e:
            raise RedisUnavailable(str(e)) from e
        return self._bounded(d, "PING")

    def close(self) -> Deferred[None]:
        transport = self._protocol.transport
        if transport is not None:
            transport.abortConnection()
        closed: Deferred[None] = self._factory.disconnect()
        closed.addErrback(lambda _: None)
        return closed


@implementer(IPubSub)
class RedisPubSub:
    """Subscriber connections to the Redis at *addr* (``host:port``), with *password* and database *db*."""

    def __init__(self, addr: str, password: str, db: int, reactor: Any, timeout: float = 3.0) -> None:
        host, _, port = addr.rpartition(":")
        self.addr = addr
        self._host = host or "localhost"
        self._port = int(port or 6379)
        self._password = password
        self._db = db
        self._reactor = reactor
        self._timeout = timeout

    def connect(self, on_message: OnMessage) -> Deferred[IPubSubLink]:
        factory = _Factory(self._password, self._db, self._timeout, on_message)
        factory.startConnecting(HostnameEndpoint(self._reactor, self._host, self._port, timeout=self._timeout))
        d = factory.ready
        # Connect, AUTH and SELECT are bounded one by one; this bounds them all together.
        d.addTimeout(self._timeout * 2, self._reactor)

        def connected(protocol: _Subscriber) -> IPubSubLink:
            return PubSubLink(protocol, factory, self._reactor, self._timeout, self.addr)

        def failed(failure: Failure) -> None:
            factory.disconnect().addErrback(lambda _: None)
            if failure.check(RedisUnavailable):
                failure.raiseException()
            raise RedisUnavailable(f"no pub/sub connection to Redis at {self.addr} within {self._timeout * 2:g}s"
                                   if failure.check(TimeoutError) else failure.getErrorMessage())

        d.addCallbacks(connected, failed)
        result: Deferred[IPubSubLink] = d  # type: ignore[assignment]
        return result
