"""Sending recache requests to Edge Gateways: EdgeComet's request, through one treq connection pool.

``POST http://{address}/internal/cache/recache`` with ``X-Internal-Auth`` and the JSON body
``{"url":…,"host_id":…,"dimension_id":…}``; success is a 200 and nothing else. ``timeout_per_url``
bounds the whole exchange, body included (treq's own timeout stops at the headers): when it fires,
the connection is closed, not left open or handed back to the pool. The status is what counts, so
the body is read only to find where the answer ends, kept nowhere, and read at most
:data:`BODY_LIMIT` bytes far: a longer one (a 200 of 100 MB is still a 200) closes the connection
instead of being read on. Work is spread round-robin over healthy gateways; one that refuses
connections or times out sits out a cool-down.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from zope.interface import Interface, implementer

from cachesvc.observe.quiet import quiet_pool
from cachesvc.recache.gojson import encode_object

BODY_LIMIT = 64 * 1024
"""How far into an answer's body the dispatcher reads before it closes the connection instead."""


@dataclass(frozen=True)
class Gateway:
    id: str
    base_url: str  # http://host:port


def gateways_from_registry(values: Sequence[bytes]) -> list[Gateway]:
    """``registry:eg:*`` values with ``sharding_enabled``, sorted by id; ``:10071`` means loopback."""
    found = []
    for raw in values:
        try:
            info: Any = json.loads(raw)
            if info.get("sharding_enabled") is not True:
                continue
            address = str(info["address"])
            eg_id = str(info["eg_id"])
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        if address.startswith(":"):
            address = "127.0.0.1" + address
        found.append(Gateway(eg_id, address if "://" in address else f"http://{address}"))
    return sorted(found, key=lambda g: g.id)


class GatewayPicker:
    """Round-robin over the current gateways, skipping those in cool-down."""

    def __init__(self, static: Sequence[str], clock: Any, cooldown: float = 5.0) -> None:
        self.static = [Gateway(url, url.rstrip("/")) for url in static]
        self._clock = clock
        self._cooldown = cooldown
        self._gateways: list[Gateway] = list(self.static)
        self._resting: dict[str, float] = {}
        self._next = 0

    def update(self, registered: list[Gateway]) -> None:
        self._gateways = registered or list(self.static)

    @property
    def usable(self) -> list[Gateway]:
        now = self._clock.seconds()
        return [g for g in self._gateways if self._resting.get(g.id, 0) <= now]

    def pick(self) -> Gateway | None:
        usable = self.usable
        if not usable:
            return None
        gateway = usable[self._next % len(usable)]
        self._next += 1
        return gateway

    def rest(self, gateway: Gateway) -> None:
        self._resting[gateway.id] = self._clock.seconds() + self._cooldown


class IDispatcher(Interface):
    """Sends one recache request to an Edge Gateway. The seam tests and embedders swap."""

    def send(gateway: Gateway, url: str, host_id: int, dimension_id: int) -> Deferred[int]:
        """Fire with the HTTP status; fail if the request was refused, reset or timed out."""

    def close() -> Deferred[None]:
        """Close idle connections; called once the scheduler has stopped."""


def pooled_client(reactor: Any, max_connections: int) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client over a persistent pool of at most *max_connections* per gateway (quiet: no line per connection)."""
    pool = quiet_pool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_connections
    pool.cachedConnectionTimeout = 30
    return HTTPClient(Agent(reactor, pool=pool)), pool


class _BodyEnd(Protocol):
    """Reads a response body to its end, keeping none of it, and closes the connection when told to stop.

    *done* fires once the body has ended, once it proves longer than *limit* (its connection is then
    closed: the rest is never read), or fails if the connection broke first. Cancelling *done* (the
    dispatcher's timeout) closes the connection. A connection closed here never goes back to the pool.
    """

    def __init__(self, length: int | None, limit: int) -> None:
        self._length = length
        self._limit = limit
        self._received = 0
        self._enough = False
        self.done: Deferred[None] = Deferred(lambda _: self._stop())

    def connectionMade(self) -> None:
        if self._length is not None and self._length > self._limit:
            self._over()  # Content-Length says so: nothing of the body has been read yet

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._over()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if self._enough or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _over(self) -> None:
        self._enough = True
        self._stop()
        if not self.done.called:
            self.done.callback(None)

    def _stop(self) -> None:
        # The response's transport proxies the connection: stopping it closes the connection (the
        # parser is left mid-body, so the pool never takes it back).
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()


def read_body_end(response: IResponse, limit: int = BODY_LIMIT) -> Deferred[None]:
    """Fire when *response*'s body has ended or proves longer than *limit*; see :class:`_BodyEnd`."""
    length = response.length
    reader = _BodyEnd(length if isinstance(length, int) else None, limit)  # else UNKNOWN_LENGTH
    response.deliverBody(reader)
    return reader.done


@implementer(IDispatcher)
class Dispatcher:
    """One request per call through *client*; fires with the HTTP status, or fails (refused, reset, timed out)."""

    def __init__(
        self,
        client: HTTPClient,
        clock: IReactorTime,
        auth_key: str,
        timeout: float,
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        self._client = client
        self._clock = clock
        self._pool = pool
        self._headers: dict[bytes | str, bytes | str] = {
            b"X-Internal-Auth": auth_key.encode(),
            b"Content-Type": b"application/json",
        }
        self._timeout = timeout
        self._targets: dict[str, EncodedURL] = {}

    def send(self, gateway: Gateway, url: str, host_id: int, dimension_id: int) -> Deferred[int]:
        body = encode_object([("url", url), ("host_id", host_id), ("dimension_id", dimension_id)])
        target = self._targets.get(gateway.base_url)
        if target is None:  # parsed once per gateway: treq would parse the text on every request
            target = EncodedURL.from_text(f"{gateway.base_url}/internal/cache/recache")
            self._targets[gateway.base_url] = target
        d = self._exchange(target, body)
        d.addTimeout(self._timeout, self._clock, onTimeoutCancel=self._timed_out)
        return d

    def _timed_out(self, result: object, timeout: float) -> object:
        """Whatever the cancelled request failed with (``ResponseNeverReceived`` before the headers), say timeout."""
        if isinstance(result, Failure):
            raise TimeoutError(f"no complete answer within {timeout:g}s (timeout_per_url)")
        return result

    @inlineCallbacks
    def _exchange(self, url: EncodedURL, body: bytes) -> Generator[Deferred[Any], Any, int]:
        # unbuffered: treq would otherwise keep a copy of the whole body for later readers
        response = yield self._client.post(url, data=body, headers=self._headers, unbuffered=True)
        yield read_body_end(response)
        return int(response.code)

    def close(self) -> Deferred[None]:
        if self._pool is None:
            return succeed(None)
        closed: Deferred[None] = self._pool.closeCachedConnections()  # unannotated in Twisted
        return closed
