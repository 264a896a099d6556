"""Cache warming: after a purge, re-request what it removed, so that the next visitor finds a HIT.

A warm request is a plain ``GET`` sent to the origin configured for the URL's scheme (where nginx
listens) with the site's ``Host`` (and SNI), no cookies and only ``User-Agent``. Its request line
must carry exactly the ``$request_uri`` that nginx builds the key from, or nginx caches some other
key. So requests go through a bare Twisted ``Agent``, not treq: treq re-encodes the URL through
hyperlink (``|`` becomes ``%7C``, a bare ``?`` is dropped), adds ``Accept-Encoding`` and keeps the
cookies answers set for the next request. A URL even the Agent would alter (a bare ``?``, a ``#``,
non-ASCII) is skipped. Warming is best effort: it never raises into the purge that asked for it.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, RequestTransmissionFailed, ResponseDone, ResponseFailed
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from cachesvc.purge.config import WarmSettings

_WIRE = re.compile(rb"[\x21-\x7e]+")
_DEFAULT_PORT = {"http": 80, "https": 443}
_EXPECTED = (ConnectError, ConnectionClosed, ResponseFailed, RequestTransmissionFailed, TimeoutError, SSL.Error)


def sendable(url: str) -> bool:
    """Whether the Agent sends *url* (``scheme://host/request_uri``) with that host and request URI unchanged."""
    scheme, sep, rest = url.partition("://")
    host, slash, tail = rest.partition("/")
    if not (sep and slash and host) or scheme not in _DEFAULT_PORT:
        return False
    try:
        raw = url.encode("ascii")
        parsed = URI.fromBytes(raw)
    except (UnicodeEncodeError, ValueError):
        return False
    wanted = (scheme.encode(), host.encode(), _DEFAULT_PORT[scheme], b"/" + tail.encode())
    return _WIRE.fullmatch(raw) is not None and (parsed.scheme, parsed.host, parsed.port, parsed.originForm) == wanted


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: the only origins whose certificates go unchecked."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Origin:
    """Where warm requests of one scheme go: TCP (or TLS) to *host*:*port*."""

    tls: bool
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        return cls(tls, parts.hostname or "", parts.port or (443 if tls else 80))


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """TLS to a loopback origin: SNI names the site (nginx picks its server by it), the certificate is not checked."""

    def __init__(self, context: SSL.Context, host: str) -> None:
        self._context = context
        self._server_name = None if isIPAddress(host) or isIPv6Address(host) else host.encode("ascii")

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


@implementer(IAgentEndpointFactory)
class OriginEndpoints:
    """Sends a request for ``scheme://site/...`` to the origin of that scheme, so the URL keeps the site's host."""

    MAX_CREATORS = 256  # verified TLS creators kept, one per site host

    def __init__(self, reactor: Any, settings: WarmSettings) -> None:
        self._reactor = reactor
        self._origins = {scheme: Origin.parse(url) for scheme, url in settings.origins}
        self._unverified: SSL.Context | None = None
        self._verified: dict[str, IOpenSSLClientConnectionCreator] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        scheme = uri.scheme.decode("ascii")
        origin = self._origins.get(scheme)
        if origin is None:
            raise SchemeNotSupported(f"purge.warm.origins has no {scheme} origin")
        endpoint = HostnameEndpoint(self._reactor, origin.host, origin.port)
        if not origin.tls:
            return endpoint
        return wrapClientTLS(self.creator(uri.host.decode("ascii"), is_loopback(origin.host)), endpoint)

    def creator(self, site: str, loopback: bool) -> IOpenSSLClientConnectionCreator:
        """SNI = *site*; the certificate checked against *site* unless the origin is loopback."""
        if loopback:
            if self._unverified is None:
                self._unverified = CertificateOptions(verify=False).getContext()
            return _Unverified(self._unverified, site)
        found = self._verified.get(site)
        if found is None:
            if len(self._verified) >= self.MAX_CREATORS:
                self._verified.clear()
            found = self._verified[site] = optionsForClientTLS(site)
        return found


class _Drain(Protocol):
    """Reads a body to its end, keeping none of it: a client that hangs up early may leave the cache entry unwritten."""

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(self._abort)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _abort(self, _: Deferred[None]) -> None:
        # stopping the body's transport closes the connection: a half-read one never goes back to the pool
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()


@dataclass(eq=False)
class _Batch:
    """One purge's warm-up: its pending URLs in order and what became of the others."""

    label: str
    urls: OrderedDict[str, None]
    skipped: int
    warmed: int = 0
    failed: int = 0
    in_flight: int = 0
    started: float | None = None  # when its delay ended
    call: IDelayedCall | None = None
    done: bool = False


class Warmer(Service):
    """Re-requests purged URLs through one connection pool, at most ``concurrency`` at a time, backing off when slow."""

    name = "warm"
    log = Logger()

    def __init__(self, settings: WarmSettings, reactor: Any, version: str, agent: IAgent | None = None) -> None:
        self.settings = settings
        self._reactor = reactor
        self._headers = Headers({b"User-Agent": [f"cachesvc-warm/{version}".encode()]})
        self._ceiling = max(1, settings.concurrency)
        self._pool: HTTPConnectionPool | None = None
        if agent is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = self._ceiling
            self._pool.cachedConnectionTimeout = 30
            quiet: Any = type("QuietFactory", (self._pool._factory,), {"noisy": False})  # no log line per connection
            self._pool._factory = quiet
            agent = Agent.usingEndpointFactory(reactor, OriginEndpoints(reactor, settings), pool=self._pool)
        self._agent: IAgent = agent
        self.limit = self._ceiling
        self._streak = 0
        self._epoch = 0  # bumped by each halving: answers to requests sent before it do not halve again
        self._owner: dict[str, _Batch] = {}  # pending URL -> the purge it will be warmed for
        self._waiting: list[_Batch] = []  # delay not over yet
        self._ready: deque[_Batch] = deque()
        self._requests: set[Deferred[Any]] = set()
        self._pumping = False
        # for metrics: warm requests answered by outcome; URLs of finished warm-ups not sent
        self.outcomes, self.skipped_urls = dict.fromkeys(("warmed", "slow", "http_5xx", "failed"), 0), 0

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    @property
    def pending(self) -> int:
        return len(self._owner)

    def warm(self, label: str, urls: Sequence[str], skipped: int = 0) -> None:
        """Warm *urls* (absolute, most recently cached first) ``delay`` seconds from now; never raises."""
        if not (self.running and self.settings.enabled):
            return
        try:
            self._add(label, urls, skipped)
        except Exception:
            self.log.failure("warm-up for purge {label!r} not scheduled", label=label)

    def _add(self, label: str, urls: Sequence[str], skipped: int) -> None:
        chosen: OrderedDict[str, None] = OrderedDict()
        for url in dict.fromkeys(urls):
            if len(chosen) >= self.settings.max_entries or not self._warmable(url):
                skipped += 1
            else:
                chosen[url] = None
        if not chosen and not skipped:
            return
        batch = _Batch(label, chosen, skipped)
        for url in chosen:
            earlier = self._owner.get(url)
            if earlier is not None:  # a new purge of the same entries replaces their pending warm-up
                del earlier.urls[url]
                earlier.skipped += 1
                self._finish_if_done(earlier)
            self._owner[url] = batch
        self._waiting.append(batch)
        # always later, even with no delay: the purge reply is written first
        batch.call = self._reactor.callLater(self.settings.delay, self._begin, batch)

    def _warmable(self, url: str) -> bool:
        return sendable(url) and self.settings.origin(url.partition(":")[0]) is not None

    def _begin(self, batch: _Batch) -> None:
        try:
            self._waiting.remove(batch)
            batch.call = None
            batch.started = self._reactor.seconds()
            self._ready.append(batch)
            if not self._finish_if_done(batch):
                self._pump()
        except Exception:
            self.log.failure("warm-up for purge {label!r} did not start", label=batch.label)

    def _pump(self) -> None:
        """Send pending URLs, oldest purge first, while fewer than ``limit`` are in flight."""
        if self._pumping:  # an answer that came at once: the loop below goes on
            return
        self._pumping = True
        try:
            while self.running and len(self._requests) < self.limit:
                while self._ready and not self._ready[0].urls:
                    self._ready.popleft()
                if not self._ready:
                    return
                batch = self._ready[0]
                url, _ = batch.urls.popitem(last=False)
                del self._owner[url]
                self._send(batch, url)
        finally:
            self._pumping = False

    def _send(self, batch: _Batch, url: str) -> None:
        batch.in_flight += 1
        started, epoch = self._reactor.seconds(), self._epoch
        d: Deferred[Any] = maybeDeferred(self._agent.request, b"GET", url.encode("ascii"), self._headers)
        d.addCallback(self._read_to_end)
        d.addTimeout(self.settings.timeout, self._reactor, onTimeoutCancel=_timed_out)
        self._requests.add(d)
        d.addBoth(self._answered, d, batch, url, started, epoch)

    @staticmethod
    def _read_to_end(response: IResponse) -> Deferred[int]:
        drain = _Drain()
        response.deliverBody(drain)
        return drain.done.addCallback(lambda _: int(response.code))

    def _answered(
        self, result: int | Failure, d: Deferred[Any], batch: _Batch, url: str, started: float, epoch: int
    ) -> None:
        self._requests.discard(d)
        batch.in_flight -= 1
        if not self.running:  # stopped: abandoned, already counted
            return
        try:
            self._judge(result, batch, url, self._reactor.seconds() - started, epoch)
        except Exception:
            self.log.failure("warm-up of {url} not accounted for", url=url)
        try:
            self._finish_if_done(batch)
            self._pump()
        except Exception:
            self.log.failure("warm-up stalled after {url}", url=url)

    def _judge(self, result: int | Failure, batch: _Batch, url: str, seconds: float, epoch: int) -> None:
        if isinstance(result, Failure):
            batch.failed += 1
            self.outcomes["failed"] += 1
            if not result.check(*_EXPECTED):
                self.log.failure("warm-up request for {url} failed unexpectedly", result, url=url)
            self._setback(f"{_describe(result)} for {url}", epoch)
        elif result >= 500:
            batch.failed += 1
            self.outcomes["http_5xx"] += 1
            self._setback(f"HTTP {result} for {url}", epoch)
        else:
            batch.warmed += 1
            self.outcomes["slow" if seconds > self.settings.slow_response else "warmed"] += 1
            if seconds > self.settings.slow_response:
                self._setback(f"slow response ({seconds:.1f} s) for {url}", epoch)
            else:
                self._succeeded()

    def _setback(self, reason: str, epoch: int) -> None:
        """Halve the limit, once per round: requests sent before the last halving measured the old level."""
        self._streak = 0
        if epoch != self._epoch or self.limit == 1:
            return
        old, self.limit = self.limit, max(1, self.limit // 2)
        self._epoch += 1
        self.log.info("warm-up concurrency {old} -> {new}: {reason}", old=old, new=self.limit, reason=reason)

    def _succeeded(self) -> None:
        self._streak += 1
        if self._streak >= self.limit:
            self._streak = 0
            self.limit = min(self._ceiling, self.limit + 1)

    def _finish_if_done(self, batch: _Batch) -> bool:
        if batch.done or batch.started is None or batch.urls or batch.in_flight:
            return False
        batch.done = True
        self.skipped_urls += batch.skipped
        if batch in self._ready:
            self._ready.remove(batch)
        self.log.info(
            "warm-up after purge {label!r}: {warmed} warmed, {failed} failed, {skipped} skipped, {seconds:.1f} s",
            label=batch.label,
            warmed=batch.warmed,
            failed=batch.failed,
            skipped=batch.skipped,
            seconds=self._reactor.seconds() - batch.started,
        )
        return True

    def stopService(self) -> Deferred[None]:
        """Abandon pending warm-ups, cancel those in flight, close the pool's idle connections."""
        Service.stopService(self)
        abandoned = len(self._owner) + len(self._requests)
        for batch in self._waiting:
            if batch.call is not None and batch.call.active():
                batch.call.cancel()
        self._waiting.clear()
        self._ready.clear()
        self._owner.clear()
        for d in list(self._requests):
            d.cancel()
        if abandoned:
            self.log.info("stopping: {n} warm-up requests abandoned", n=abandoned)
        if self._pool is None:
            return succeed(None)
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed


def _timed_out(result: object, timeout: float) -> object:
    """Whatever the cancelled request failed with (``ResponseNeverReceived`` before the headers), say timeout."""
    if isinstance(result, Failure):
        raise TimeoutError(f"no complete answer within {timeout:g} s")
    return result


def _describe(failure: Failure) -> str:
    """``ConnectionRefusedError: ...`` rather than a list of wrapped failures."""
    error = failure.value
    reasons = getattr(error, "reasons", None)  # ResponseFailed and its kin wrap the real reasons
    if reasons and isinstance(reasons[0], Failure):
        error = reasons[0].value
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
