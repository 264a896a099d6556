"""Sending recache requests to Edge Gateways: EdgeComet's request, through one treq connection pool.

``POST http://{address}/internal/cache/recache`` with ``X-Internal-Auth`` and the JSON body
``{"url":…,"host_id":…,"dimension_id":…}``; success is a 200 and nothing else. ``timeout_per_url``
bounds the whole exchange, body included (treq's own timeout stops at the headers). Work is spread
round-robin over healthy gateways; one that refuses connections or times out sits out a cool-down.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import treq
from hyperlink import EncodedURL
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web.client import HTTPConnectionPool

from cachesvc.recache.gojson import encode_object


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


class Dispatcher:
    """One request per call; fires with the HTTP status, or fails (refused, reset, timed out)."""

    def __init__(self, reactor: Any, auth_key: str, timeout: float, max_connections: int) -> None:
        self._reactor = reactor
        self._headers = {b"X-Internal-Auth": auth_key.encode(), b"Content-Type": b"application/json"}
        self._timeout = timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max_connections
        self.pool.cachedConnectionTimeout = 30
        self._targets: dict[str, EncodedURL] = {}

    def send(self, gateway: Gateway, url: str, host_id: int, dimension_id: int) -> Deferred[int]:
        body = encode_object([("url", url), ("host_id", host_id), ("dimension_id", dimension_id)])
        target = self._targets.get(gateway.base_url)
        if target is None:  # parsed once per gateway: treq would parse the text on every request
            target = self._targets[gateway.base_url] = EncodedURL.from_text(f"{gateway.base_url}/internal/cache/recache")
        d = self._exchange(target, body)
        d.addTimeout(self._timeout, self._reactor)
        return d

    @inlineCallbacks
    def _exchange(self, url: EncodedURL, body: bytes):  # type: ignore[no-untyped-def]
        response = yield treq.post(url, data=body, headers=self._headers, pool=self.pool, reactor=self._reactor)
        yield treq.content(response)
        return response.code

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()
