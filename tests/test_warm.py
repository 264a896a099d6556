"""Cache warming's HTTP side (cachesvc.purge.warm), at two speeds.

On a ``Clock`` with a hand-driven agent: the delay, the concurrency cap, dedupe, replacement by a
newer purge, ``max_entries``, halving and raising the limit, the timeout over the whole exchange,
stopping, the log lines. Then over real sockets on 127.0.0.1: a twisted.web origin that records
what nginx would see (Host, User-Agent, request URI, Cookie, concurrent requests), and a TLS origin
with a self-signed certificate that records the SNI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from cachesvc.purge import warm
from cachesvc.purge.config import WarmSettings
from cachesvc.purge.warm import Warmer, is_loopback, sendable

SITE = "https://example.com"


# --- a hand-driven agent -------------------------------------------------------------------------


class Body:
    """The body transport of a fake response: notes whether the reader stopped it (closing the connection)."""

    stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


@dataclass
class Response:
    code: int
    body: Body = field(default_factory=Body)
    reader: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.reader = protocol
        protocol.makeConnection(self.body)

    def end(self) -> None:
        self.reader.dataReceived(b"x" * 100)
        self.reader.connectionLost(Failure(ResponseDone()))


@dataclass
class Call:
    method: bytes
    uri: bytes
    headers: Headers
    d: Deferred[Any]
    cancelled: bool = False

    @property
    def url(self) -> str:
        return self.uri.decode()

    def answer(self, code: int = 200, whole: bool = True) -> Response:
        response = Response(code)
        self.d.callback(response)
        if whole:
            response.end()
        return response


class Agent:
    def __init__(self) -> None:
        self.calls: list[Call] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None) -> Any:
        def cancel(_: Any) -> None:
            call.cancelled = True

        call = Call(method, uri, headers or Headers(), Deferred(cancel))
        self.calls.append(call)
        return call.d

    def open(self) -> list[Call]:
        return [c for c in self.calls if not c.d.called]

    def urls(self) -> list[str]:
        return [c.url for c in self.calls]


def make(**settings: Any) -> tuple[Warmer, Agent, Clock]:
    clock, agent = Clock(), Agent()
    values: dict[str, Any] = {"enabled": True, "concurrency": 2, "slow_response": 2.0, "timeout": 10.0}
    values.update(settings)
    warmer = Warmer(WarmSettings(**values), clock, "1.2.3", agent=agent)  # type: ignore[arg-type]
    warmer.startService()
    return warmer, agent, clock


def pages(n: int, site: str = SITE) -> list[str]:
    return [f"{site}/p/{i}/" for i in range(n)]


def summaries(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("warm-up after purge")]


# --- on a clock ----------------------------------------------------------------------------------


def test_warming_waits_for_the_reactor_even_without_a_delay_then_sends_plain_gets() -> None:
    warmer, agent, clock = make()
    warmer.warm("site", ["https://example.com/blog/?p=1", "http://other.example/a%2Fb|c?x=%7e&&y"])
    assert agent.calls == [] and warmer.pending == 2  # the purge reply is written first
    clock.advance(0)
    assert [(c.method, c.uri) for c in agent.calls] == [
        (b"GET", b"https://example.com/blog/?p=1"),
        (b"GET", b"http://other.example/a%2Fb|c?x=%7e&&y"),
    ]
    for call in agent.calls:  # only the User-Agent: no cookies, no Accept-Encoding (the Agent adds Host)
        assert list(call.headers.getAllRawHeaders()) == [(b"User-Agent", [b"cachesvc-warm/1.2.3"])]


def test_the_delay_is_waited_out() -> None:
    warmer, agent, clock = make(delay=5.0)
    warmer.warm("site", pages(1))
    clock.advance(4.9)
    assert agent.calls == []
    clock.advance(0.1)
    assert agent.urls() == pages(1)


def test_at_most_concurrency_in_flight_in_the_given_order_each_url_once(logged: list[str]) -> None:
    warmer, agent, clock = make(concurrency=3)
    urls = pages(8)
    warmer.warm("site", urls[:5] + [urls[0], urls[2]] + urls[5:])
    clock.advance(0)
    assert agent.urls() == urls[:3] and warmer.in_flight == 3 and warmer.pending == 5
    agent.calls[1].answer()
    assert agent.urls() == urls[:4] and warmer.in_flight == 3
    while agent.open():
        agent.open()[0].answer()
    assert agent.urls() == urls and warmer.in_flight == 0 and warmer.pending == 0
    assert summaries(logged) == ["warm-up after purge 'site': 8 warmed, 0 failed, 0 skipped, 0.0 s"]


def test_max_entries_and_unwarmable_urls_count_as_skipped(logged: list[str]) -> None:
    warmer, agent, clock = make(concurrency=10, max_entries=3, origins=(("https", "https://127.0.0.1:443"),))
    unwarmable = ["http://example.com/no-http-origin", f"{SITE}/?", f"{SITE}/a#b", f"{SITE}/caf\u00e9", "nonsense"]
    warmer.warm("site", unwarmable + pages(5), skipped=7)
    clock.advance(1)
    assert agent.urls() == pages(3)
    for call in agent.calls:
        call.answer()
    assert summaries(logged) == ["warm-up after purge 'site': 3 warmed, 0 failed, 14 skipped, 0.0 s"]


def test_a_newer_purge_takes_over_pending_urls_and_rewarms_one_in_flight(logged: list[str]) -> None:
    warmer, agent, clock = make(concurrency=1)
    a, b, c, d = pages(4)
    warmer.warm("first", [a, b, c])
    clock.advance(0)
    assert agent.urls() == [a]
    warmer.warm("second", [b, d, a])  # b is pending for "first": it moves; a is in flight: sent again
    assert warmer.pending == 4  # c for first; b, d, a for second
    clock.advance(3)
    agent.calls[0].answer()  # a, for first
    agent.calls[1].answer()  # c, the rest of first
    assert summaries(logged) == ["warm-up after purge 'first': 2 warmed, 0 failed, 1 skipped, 3.0 s"]
    while agent.open():
        agent.open()[0].answer()
    assert agent.urls() == [a, c, b, d, a]
    assert summaries(logged)[1] == "warm-up after purge 'second': 3 warmed, 0 failed, 0 skipped, 0.0 s"


def test_a_purge_whose_urls_all_moved_on_still_reports(logged: list[str]) -> None:
    warmer, agent, clock = make(delay=2.0)
    warmer.warm("first", pages(2))
    warmer.warm("second", pages(2))
    clock.advance(2)
    assert summaries(logged) == ["warm-up after purge 'first': 0 warmed, 0 failed, 2 skipped, 0.0 s"]
    assert agent.urls() == pages(2)


def test_each_kind_of_trouble_halves_the_limit_once_per_round(logged: list[str]) -> None:
    warmer, agent, clock = make(concurrency=8, slow_response=2.0, timeout=10.0)
    warmer.warm("site", pages(40))
    clock.advance(0)
    calls = agent.calls
    assert warmer.limit == 8 and warmer.in_flight == 8
    calls[0].answer(502)
    assert warmer.limit == 4
    calls[1].answer(503)  # sent at 8: says nothing about 4
    calls[2].d.errback(ConnectionRefusedError())
    assert warmer.limit == 4 and warmer.in_flight == 5 and len(calls) == 8  # drains down to the new limit
    calls[3].answer()
    calls[4].answer()
    assert len(calls) == 9 and warmer.in_flight == 4
    clock.advance(2.5)
    calls[8].answer()  # sent at 4 and slow: halves, yet it is warmed
    assert warmer.limit == 2
    for old in calls[5:8]:
        old.answer()  # slow too, but sent at 8
    assert warmer.limit == 2 and len(calls) == 11
    clock.advance(10)  # calls 9 and 10 time out: one halving
    assert calls[9].cancelled and calls[10].cancelled and warmer.limit == 1
    calls[11].d.errback(ConnectionRefusedError())
    assert warmer.limit == 1  # the floor
    assert [line for line in logged if "concurrency" in line] == [
        f"warm-up concurrency 8 -> 4: HTTP 502 for {SITE}/p/0/",
        f"warm-up concurrency 4 -> 2: slow response (2.5 s) for {calls[8].url}",
        f"warm-up concurrency 2 -> 1: TimeoutError: no complete answer within 10 s for {calls[9].url}",
    ]


def test_runs_of_successes_raise_the_limit_back_to_concurrency() -> None:
    warmer, agent, clock = make(concurrency=4)
    warmer.warm("site", pages(60))
    clock.advance(0)
    agent.calls[0].answer(500)
    assert warmer.limit == 2
    steps = []
    for _ in range(12):
        agent.open()[0].answer()
        steps.append(warmer.limit)
        assert warmer.in_flight <= warmer.limit or warmer.in_flight == 3  # the first round drains
    # 2 successes in a row at 2, 3 at 3, then it stays at 4
    assert steps == [2, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4]
    agent.open()[0].d.errback(ConnectionRefusedError())
    assert warmer.limit == 2
    agent.open()[0].answer()
    assert warmer.limit == 2  # the run starts again after a failure


def test_the_timeout_covers_the_body_and_closes_the_connection(logged: list[str]) -> None:
    warmer, agent, clock = make(timeout=5.0)
    warmer.warm("site", pages(1))
    clock.advance(0)
    clock.advance(1)
    response = agent.calls[0].answer(200, whole=False)  # headers, then the body stalls
    clock.advance(3.9)
    assert not response.body.stopped
    clock.advance(0.2)
    assert response.body.stopped and warmer.in_flight == 0
    assert summaries(logged) == ["warm-up after purge 'site': 0 warmed, 1 failed, 0 skipped, 5.1 s"]


def test_a_request_that_never_answers_is_cancelled_at_the_timeout(logged: list[str]) -> None:
    warmer, agent, clock = make(timeout=5.0)
    warmer.warm("site", pages(1))
    clock.advance(0)
    clock.advance(5)
    assert agent.calls[0].cancelled
    assert summaries(logged) == ["warm-up after purge 'site': 0 warmed, 1 failed, 0 skipped, 5.0 s"]


def test_stop_abandons_pending_and_cancels_in_flight(logged: list[str]) -> None:
    warmer, agent, clock = make(concurrency=2, delay=1.0)
    warmer.warm("now", pages(5))
    clock.advance(1)
    warmer.warm("later", pages(3, "https://other.example"))
    stopped = warmer.stopService()
    assert stopped.called
    assert all(c.cancelled for c in agent.calls) and len(agent.calls) == 2
    assert clock.getDelayedCalls() == []
    assert "stopping: 8 warm-up requests abandoned" in logged
    assert summaries(logged) == []
    assert warmer.pending == 0 and warmer.in_flight == 0
    warmer.warm("after", pages(1))
    clock.advance(5)
    assert len(agent.calls) == 2


def test_nothing_happens_when_disabled_or_not_running(logged: list[str]) -> None:
    warmer, agent, clock = make(enabled=False)
    warmer.warm("site", pages(3))
    idle, idle_agent, idle_clock = make()
    idle.stopService()
    idle.warm("site", pages(3))
    assert clock.getDelayedCalls() == [] == idle_clock.getDelayedCalls()
    assert agent.calls == [] == idle_agent.calls and logged == []


def test_trouble_inside_never_reaches_the_purge(logged: list[str]) -> None:
    warmer, agent, clock = make()

    class Broken(list[str]):
        def __iter__(self) -> Any:
            raise RuntimeError("boom")

    warmer.warm("site", Broken())
    assert any("not scheduled" in line for line in logged)

    def refuse(*_: Any, **__: Any) -> Any:
        raise ValueError("an agent that raises")

    agent.request = refuse  # type: ignore[method-assign]
    warmer.warm("site", pages(1))
    clock.advance(0)
    assert summaries(logged) == ["warm-up after purge 'site': 0 warmed, 1 failed, 0 skipped, 0.0 s"]
    assert any("failed unexpectedly" in line for line in logged)


def test_an_answer_that_comes_at_once_does_not_recurse() -> None:
    warmer, agent, clock = make(concurrency=4)
    done = Response(200)
    agent.request = lambda *_, **__: succeed(done)  # type: ignore[method-assign,assignment]
    done.deliverBody = lambda protocol: protocol.connectionLost(Failure(ResponseDone()))  # type: ignore[method-assign]
    warmer.warm("site", pages(5000))
    clock.advance(0)
    assert warmer.pending == 0 and warmer.in_flight == 0


def test_sendable_and_loopback() -> None:
    assert sendable("https://example.com/a%2Fb|c^d?x=%7e&&y=")
    assert sendable("http://example.com/")
    for url in [
        "https://example.com/?",
        "https://example.com/a#b",
        "https://example.com/\u00e9",
        "https://ex ample/",
        "https://[::1]/x",
        "https://example.com:8443/x",
        "ftp://example.com/",
        "https://example.com",
    ]:
        assert not sendable(url), url
    assert all(is_loopback(h) for h in ["127.0.0.1", "127.9.8.7", "::1", "localhost", "LOCALHOST"])
    assert not any(is_loopback(h) for h in ["10.0.0.1", "192.0.2.1", "::2", "example.com", "localhost.example"])


# --- over real sockets ---------------------------------------------------------------------------


async def sleep(seconds: float) -> None:
    await deferLater(global_reactor, seconds, lambda: None)


async def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = global_reactor.seconds() + timeout
    while not check():
        if global_reactor.seconds() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await sleep(0.02)


async def bounded(d: Deferred[Any] | None, seconds: float = 10.0) -> Any:
    return None if d is None else await d.addTimeout(seconds, global_reactor)


class Recorder(Resource):
    """An origin that answers after *pause* seconds (never, with *stall*), noting what each request carried."""

    isLeaf = True

    def __init__(self, pause: float = 0.05, body: bytes = b"x" * 200_000, stall: bool = False) -> None:
        super().__init__()
        self.pause, self.body, self.stall = pause, body, stall
        self.seen: list[dict[str, Any]] = []
        self.active = self.peak = self.lost = 0
        self.channels: list[Any] = []

    def render_GET(self, request: Request) -> Any:
        self.seen.append(
            {
                "host": request.getHeader(b"host"),
                "agent": request.getHeader(b"user-agent"),
                "uri": request.uri,
                "cookie": request.getHeader(b"cookie"),
                "headers": sorted(name.lower() for name, _ in request.requestHeaders.getAllRawHeaders()),
                "sni": getattr(request.channel.transport, "sni", None),
            }
        )
        self.channels.append(request.channel)
        self.active += 1
        self.peak = max(self.peak, self.active)
        request.addCookie(b"session", b"abc", path=b"/")  # a client that keeps cookies would send it back
        finished = request.notifyFinish()
        finished.addCallbacks(lambda _: None, lambda _: setattr(self, "lost", self.lost + 1))
        finished.addBoth(lambda _: setattr(self, "active", self.active - 1))
        if self.stall:
            request.write(b"the first bytes of a body that never ends")
        else:
            global_reactor.callLater(self.pause, self._answer, request)
        return NOT_DONE_YET

    def _answer(self, request: Request) -> None:
        if not request.finished and request.channel is not None:  # the client may have gone
            request.write(self.body)
            request.finish()

    def closed(self) -> bool:
        return all(channel.transport is None or channel.transport.disconnected for channel in self.channels)


def origin_settings(scheme: str, port: int, **settings: Any) -> WarmSettings:
    values: dict[str, Any] = {"enabled": True, "origins": ((scheme, f"{scheme}://127.0.0.1:{port}"),)}
    values.update(settings)
    return WarmSettings(**values)


@pytest_twisted.ensureDeferred
async def test_real_origin_sees_each_site_host_the_exact_uri_no_cookie_and_the_cap(logged: list[str]) -> None:
    recorder = Recorder()
    port = global_reactor.listenTCP(0, Site(recorder), interface="127.0.0.1")
    warmer = Warmer(origin_settings("http", port.getHost().port, concurrency=3), global_reactor, "9.9")
    warmer.startService()
    paths = ["/", "/a%2Fb|c^d?x=%7e&&y=", "/caf%C3%A9/", "//double//slash/", "/x;p=1/z?q", "/?s=a+b"]
    urls = [f"http://{host}{path}" for host in ("a.example", "b.example") for path in paths] + [
        f"http://c.example/p/{i}/" for i in range(6)
    ]
    try:
        warmer.warm("sites", urls)
        await wait_until(lambda: any(line.startswith("warm-up after purge") for line in logged), "warm-up")
    finally:
        await bounded(warmer.stopService())
        await wait_until(recorder.closed, "the pool's connections closed")
        await bounded(port.stopListening())
    assert summaries(logged)[0].startswith("warm-up after purge 'sites': 18 warmed, 0 failed, 0 skipped, ")
    assert sorted((s["host"], s["uri"]) for s in recorder.seen) == sorted(
        (url.split("/")[2].encode(), ("/" + url.split("/", 3)[3]).encode()) for url in urls
    )
    assert {s["agent"] for s in recorder.seen} == {b"cachesvc-warm/9.9"}
    assert {s["cookie"] for s in recorder.seen} == {None}
    assert {tuple(s["headers"]) for s in recorder.seen} == {(b"host", b"user-agent")}
    assert recorder.peak == 3  # the cap, and reached


@pytest_twisted.ensureDeferred
async def test_real_origin_that_stalls_is_cut_off_at_the_timeout_and_stop_aborts(logged: list[str]) -> None:
    recorder = Recorder(stall=True)
    port = global_reactor.listenTCP(0, Site(recorder), interface="127.0.0.1")
    warmer = Warmer(origin_settings("http", port.getHost().port, timeout=0.5, concurrency=1), global_reactor, "9.9")
    warmer.startService()
    try:
        started = global_reactor.seconds()
        warmer.warm("stall", ["http://a.example/slow-body/"])
        await wait_until(lambda: recorder.lost == 1, "the stalled connection closed", timeout=5)
        assert global_reactor.seconds() - started < 2.0
        assert summaries(logged)[0].startswith("warm-up after purge 'stall': 0 warmed, 1 failed, 0 skipped, ")
        warmer.warm("stopped", ["http://a.example/in-flight/", "http://a.example/pending/"])
        await wait_until(lambda: len(recorder.seen) == 2, "the second request")
        await bounded(warmer.stopService())
        await wait_until(lambda: recorder.lost == 2, "the in-flight request aborted by stop", timeout=5)
        assert "stopping: 2 warm-up requests abandoned" in logged
    finally:
        if warmer.running:
            await bounded(warmer.stopService())
        await bounded(port.stopListening())


@implementer(IOpenSSLContextFactory)
class ServerContext:
    def __init__(self, context: Any) -> None:
        self.context = context

    def getContext(self) -> Any:
        return self.context


def tls_origin(recorder: Recorder, host: str) -> Any:
    """Listen for TLS on 127.0.0.1 with a self-signed certificate for *host*; note each connection's SNI."""
    pytest.importorskip("cryptography")
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from OpenSSL import SSL

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate(cert)
    context.use_privatekey(key)
    sni_seen: list[bytes | None] = []

    def on_server_name(connection: Any) -> None:
        sni_seen.append(connection.get_servername())

    context.set_tlsext_servername_callback(on_server_name)
    port = global_reactor.listenSSL(0, Site(recorder), ServerContext(context), interface="127.0.0.1")
    return port, sni_seen


@pytest_twisted.ensureDeferred
async def test_https_to_a_loopback_origin_sends_the_site_as_sni_and_host(logged: list[str]) -> None:
    recorder = Recorder(pause=0.0)
    port, sni_seen = tls_origin(recorder, "site.example")
    warmer = Warmer(origin_settings("https", port.getHost().port), global_reactor, "9.9")
    warmer.startService()
    try:
        warmer.warm("tls", ["https://site.example/secure/?x=1"])
        await wait_until(lambda: bool(summaries(logged)), "warm-up")
    finally:
        await bounded(warmer.stopService())
        await bounded(port.stopListening())
    assert summaries(logged)[0].startswith("warm-up after purge 'tls': 1 warmed, 0 failed, 0 skipped, ")
    assert sni_seen == [b"site.example"]
    assert [(s["host"], s["uri"]) for s in recorder.seen] == [(b"site.example", b"/secure/?x=1")]


@pytest_twisted.ensureDeferred
async def test_https_to_an_origin_elsewhere_checks_the_certificate(
    logged: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(pause=0.0)
    port, sni_seen = tls_origin(recorder, "site.example")
    monkeypatch.setattr(warm, "is_loopback", lambda host: False)  # as if 127.0.0.1 were another machine
    warmer = Warmer(origin_settings("https", port.getHost().port), global_reactor, "9.9")
    warmer.startService()
    try:
        warmer.warm("tls", ["https://site.example/secure/"])
        await wait_until(lambda: bool(summaries(logged)), "warm-up")
    finally:
        await bounded(warmer.stopService())
        await bounded(port.stopListening())
    assert summaries(logged)[0].startswith("warm-up after purge 'tls': 0 warmed, 1 failed, 0 skipped, ")
    assert sni_seen == [b"site.example"] and recorder.seen == []  # a self-signed certificate is refused
