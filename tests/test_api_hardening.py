"""The API against hostile or broken input, in-process (issue 9): what a client may hold, and 400/503, not 500.

Handlers and the resource are built directly over an in-memory store double (so a test sees what
reached the store); the connection limits are checked on a real ``ApiSite`` on 127.0.0.1:0 in the
test reactor, with blocking clients on a worker thread (``deferToThread``), each bounded by
``addTimeout``. Expected messages are Go's where Go has one (``strconv.Atoi`` refusals,
``encoding/json``'s "exceeded max depth"), written out here, not imported from the code.
"""

from __future__ import annotations

import dataclasses
import json
import select
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from cachesvc import config
from cachesvc.api import query
from cachesvc.api.http import ApiResource, Handler
from cachesvc.api.listings import Listings
from cachesvc.api.queues import Queues
from cachesvc.api.routes import api_site
from cachesvc.api.writes import Writes
from cachesvc.recache.redisclient import RedisError
from cachesvc.recache.settings import RecacheSettings
from cachesvc.recache.store import Enqueued, QueuePage

KEY = "test-internal-auth-key"
UNAUTHORIZED = b'{"success":false,"message":"unauthorized"}'
OOM = "OOM command not allowed when used memory > 'maxmemory'."
_sync = SynchronousTestCase()


def write_settings(tmp_path: Path) -> RecacheSettings:
    (tmp_path / "hosts.yaml").write_text(
        "hosts:\n"
        "  - id: 1\n    domain: test.example.com\n    dimensions:\n      desktop: {id: 1}\n      mobile: {id: 2}\n"
        "  - id: 10\n    domain: ten.example\n")
    (tmp_path / "edge-gateway.yaml").write_text(f"internal: {{auth_key: {KEY}}}\nhosts: {{include: hosts.yaml}}\n")
    conf = tmp_path / "cd.yaml"
    conf.write_text("eg_config: edge-gateway.yaml\ndaemon_id: cd-test\nredis: {addr: '127.0.0.1:1'}\n"
                    "http_api: {request_timeout: 1s, max_body_size: 1000000}\n")
    resolved = config.resolve(str(conf)).recache
    assert resolved is not None
    return resolved


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> RecacheSettings:
    return write_settings(tmp_path_factory.mktemp("hardening"))


class Store:
    """The store calls of the writes and listings; ``error`` makes every one fail as Redis would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.error: Exception | None = None

    def _answer(self, name: str, args: tuple[Any, ...], value: Any) -> Deferred[Any]:
        self.calls.append((name, args))
        return fail(self.error) if self.error is not None else succeed(value)

    def enqueue(self, host_id: int, priority: str, members: list[bytes], score: int, limit: int) -> Deferred[Any]:
        return self._answer("enqueue", (host_id, priority), Enqueued(True, len(members), 0))

    def delete_each(self, names: list[bytes]) -> Deferred[Any]:
        return self._answer("delete_each", (len(names),), [0] * len(names))

    def delete_metadata(self, host_id: int, dimension_ids: list[int] | None) -> Deferred[Any]:
        return self._answer("delete_metadata", (host_id,), 0)

    def scan_metadata(self, host_id: int, cursor: bytes, count: int = 500) -> Deferred[Any]:
        if not cursor.isdigit() or int(cursor) >= 2**64:  # Redis's parseScanCursorOrReply
            return fail(RedisError("ERR invalid cursor"))
        return self._answer("scan_metadata", (host_id, cursor), (b"0", []))

    def queue_page(self, host_id: int, priorities: list[str], offset: int, size: int) -> Deferred[Any]:
        return self._answer("queue_page", (host_id, offset, size), QueuePage(0, []))

    def deadletters(self, host_id: int) -> Deferred[Any]:
        return self._answer("deadletters", (host_id,), [])

    def requeue_dead(self, host_id: int) -> Deferred[Any]:
        return self._answer("requeue_dead", (host_id,), 0)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def healthz(request: Request) -> tuple[int, bytes]:
    return 200, b'{"success":true}'


class Api:
    """The real handlers of the writes and listings behind an ``ApiResource``, driven by StubTreq."""

    def __init__(self, settings: RecacheSettings, reactor: Any = global_reactor,
                 extra: dict[tuple[bytes, bytes], Handler] | None = None) -> None:
        self.settings = settings
        self.store = Store()
        compute: Any = lambda work: maybeDeferred(work)  # noqa: E731
        edge = settings.edge
        writes = Writes(edge, self.store, reactor, settings.high_queue_limit, compute)  # type: ignore[arg-type]
        listings = Listings(edge, self.store, reactor)  # type: ignore[arg-type]
        queues = Queues(edge, self.store, reactor, compute)  # type: ignore[arg-type]
        routes: dict[tuple[bytes, bytes], Handler] = {
            (b"POST", b"/internal/cache/recache"): writes.recache,
            (b"POST", b"/internal/cache/invalidate"): writes.invalidate,
            (b"POST", b"/internal/cache/invalidate-all"): writes.invalidate_all,
            (b"GET", b"/internal/cache/urls"): listings.cache_urls,
            (b"GET", b"/internal/cache/summary"): listings.cache_summary,
            (b"GET", b"/internal/cache/queue"): queues.queue,
            (b"GET", b"/internal/cache/deadletter"): queues.deadletter,
            (b"POST", b"/internal/cache/deadletter/requeue"): queues.requeue_deadletter,
            **(extra or {}),
        }
        self.resource = ApiResource(KEY, routes, reactor, settings.request_timeout, healthz)
        self.stub = StubTreq(self.resource)

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict[bytes, list[bytes]] | None = None) -> tuple[int, bytes]:
        sent = headers if headers is not None else {b"X-Internal-Auth": [KEY.encode()]}
        d = self.stub.request(method, "http://cd.test" + path, data=body, headers=sent)
        self.stub.flush()
        response = _sync.successResultOf(d)
        content = self.stub.content(response)
        self.stub.flush()
        return response.code, _sync.successResultOf(content)

    def json(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        code, raw = self.call(method, path, body)
        return code, json.loads(raw)


@pytest.fixture
def api(settings: RecacheSettings) -> Api:
    return Api(settings)


def refusal(message: str) -> dict[str, Any]:
    return {"success": False, "message": message}


# --- numbers as Go's strconv.Atoi reads them ------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("7", 7), ("+7", 7), ("-7", -7), ("007", 7), ("0" * 40 + "1", 1),
    ("9223372036854775807", 2**63 - 1), ("-9223372036854775808", -(2**63)),
    ("9223372036854775808", None), ("-9223372036854775809", None), ("9" * 5000, None),
    ("", None), ("+", None), ("-", None), ("1_0", None), (" 1", None), ("1 ", None), ("1\n", None),
    ("\u0661", None), ("\u0661\u0660", None), ("\uff11", None), ("\u00b2", None), ("0x10", None), ("1e3", None),
    ("1.0", None), ("--1", None), ("+-1", None),
])
def test_atoi_is_gos(text: str, value: int | None) -> None:
    assert query.atoi(text) == value


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("18446744073709551615", 2**64 - 1), ("18446744073709551616", None), ("+1", None), ("-1", None),
    ("1_0", None), ("\u0661", None), ("", None), ("abc", None),
])
def test_parse_uint_is_gos(text: str, value: int | None) -> None:
    assert query.parse_uint(text) == value


@pytest.mark.parametrize("path, message", [
    ("/internal/cache/urls?host_id=1_0", "host_id must be a valid integer"),  # int() read 10, a configured host
    ("/internal/cache/urls?host_id=%D9%A1", "host_id must be a valid integer"),  # Arabic-Indic 1
    ("/internal/cache/urls?host_id=%D9%A1%D9%A0", "host_id must be a valid integer"),  # Arabic-Indic 10
    ("/internal/cache/urls?host_id=%201", "host_id must be a valid integer"),
    ("/internal/cache/urls?host_id=1%20", "host_id must be a valid integer"),
    ("/internal/cache/summary?host_id=1_0", "host_id must be a valid integer"),
    ("/internal/cache/queue?host_id=%EF%BC%91", "host_id must be a valid integer"),  # fullwidth 1
    ("/internal/cache/deadletter?host_id=1_0", "host_id must be a valid integer"),
    ("/internal/cache/urls?host_id=1&limit=1_0", "limit must be a valid integer"),
    ("/internal/cache/urls?host_id=1&limit=%D9%A5", "limit must be a valid integer"),
    ("/internal/cache/queue?host_id=1&limit=1_0", "limit must be a valid integer"),
    ("/internal/cache/urls?host_id=1&size_min=1_0", "size_min must be a valid integer"),
    ("/internal/cache/urls?host_id=1&cache_age_max=%D9%A5", "cache_age_max must be a valid integer"),
    ("/internal/cache/urls?host_id=1&status_code=2_00", "invalid status_code filter: 2_00 (must be numeric)"),
    ("/internal/cache/urls?host_id=1&status_code=200,%D9%A2%D9%A0%D9%A0",
     "invalid status_code filter: \u0662\u0660\u0660 (must be numeric)"),
    ("/internal/cache/urls?host_id=1&status_code=%2B200,x", "invalid status_code filter: x (must be numeric)"),
    ("/internal/cache/urls?host_id=99999999999999999999", "host_id must be a valid integer"),
])
def test_numbers_go_refuses_are_400(api: Api, path: str, message: str) -> None:
    assert api.json("GET", path) == (400, refusal(message))
    assert api.store.calls == []


def test_numbers_go_accepts(api: Api) -> None:
    assert api.json("GET", "/internal/cache/urls?host_id=%2B1&limit=%2B5")[0] == 200  # "+1", "+5"
    assert api.json("GET", "/internal/cache/urls?host_id=1&limit=+5") == (400, refusal("limit must be a valid integer"))
    assert api.json("GET", "/internal/cache/urls?host_id=01&limit=%2B5&status_code=%2B200")[0] == 200
    assert [args for name, args in api.store.calls if name == "scan_metadata"] == [(1, b"0"), (1, b"0")]


def test_queue_offsets_go_cannot_read_are_0(api: Api) -> None:
    for cursor in ("1_0", "%D9%A5", "%205", "abc", "-3", "99999999999999999999"):
        assert api.json("GET", f"/internal/cache/queue?host_id=1&cursor={cursor}")[0] == 200
    assert api.json("GET", "/internal/cache/queue?host_id=1&cursor=%2B7")[0] == 200
    assert [args[1] for name, args in api.store.calls if name == "queue_page"] == [0, 0, 0, 0, 0, 0, 7]


# --- the cache listing's cursor ---------------------------------------------------------------------


@pytest.mark.parametrize("cursor", ["abc", "18446744073709551616", "99999999999999999999999", "-1", "%2B1", "1_0",
                                    "%D9%A1", "5-x", "5-", "5--1", "5-%2B1", "-", "0x10", "5-99999999999999999999"])
def test_cache_urls_cursor_that_is_no_scan_cursor_is_400(api: Api, cursor: str) -> None:
    code, answer = api.json("GET", f"/internal/cache/urls?host_id=1&cursor={cursor}")
    assert (code, answer["success"]) == (400, False)
    assert answer["message"].startswith("invalid cursor: ")
    assert api.store.calls == []


def test_cache_urls_cursor_in_range(api: Api) -> None:
    for cursor in ("18446744073709551615", "0042-3", ""):
        assert api.json("GET", f"/internal/cache/urls?host_id=1&cursor={cursor}")[0] == 200
    assert [args[1] for _, args in api.store.calls] == [b"18446744073709551615", b"42", b"0"]


# --- JSON nested beyond Go's limit ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/internal/cache/recache", "/internal/cache/invalidate",
                                  "/internal/cache/invalidate-all", "/internal/cache/deadletter/requeue"])
@pytest.mark.parametrize("opening, closing, char", [(b"[", b"]", "["), (b'{"a":', b"}", "{")])
def test_json_nested_100000_deep_is_400_as_in_go(api: Api, path: str, opening: bytes, closing: bytes,
                                                  char: str) -> None:
    body = opening * 100_000 + b"1" + closing * 100_000
    message = f"invalid json: invalid character '{char}' exceeded max depth"
    assert api.json("POST", path, body) == (400, refusal(message))
    assert api.store.calls == []


def test_json_nesting_up_to_10000_is_decoded_as_in_go(api: Api) -> None:
    deep = b"[" * 9999 + b"]" * 9999  # inside the body's object: 10,000 levels in all
    body = b'{"host_id":1,"urls":["https://test.example.com/"],"priority":"high","extra":' + deep + b"}"
    assert api.json("POST", "/internal/cache/recache", body)[0] == 200
    over = body.replace(deep, b"[" + deep + b"]")
    assert api.json("POST", "/internal/cache/recache", over) == (
        400, refusal("invalid json: invalid character '[' exceeded max depth"))
    # A syntax error before the level that is too deep is the error Go reports.
    early = b'{"host_id":1,,' + b"[" * 20000
    assert api.json("POST", "/internal/cache/recache", early)[1]["message"] == (
        "invalid json: invalid character ',' looking for beginning of object key string")
    mismatch = b'{"host_id":' + b"[" * 500 + b"1" + b"]" * 500 + b"}"
    assert api.json("POST", "/internal/cache/recache", mismatch)[1]["message"] == (
        "invalid json: json: cannot unmarshal array into Go struct field RecacheAPIRequest.host_id of type int")
    assert api.store.names() == ["enqueue"]


# --- X-Internal-Auth given twice: the first counts, as Go's Header.Get ------------------------------


def test_first_of_two_auth_headers_counts(api: Api) -> None:
    path = "/internal/cache/queue?host_id=1"
    assert api.call("GET", path, headers={b"X-Internal-Auth": [KEY.encode(), b"wrong"]})[0] == 200
    assert api.call("GET", path, headers={b"X-Internal-Auth": [b"wrong", KEY.encode()]}) == (401, UNAUTHORIZED)
    assert api.call("GET", path, headers={b"X-Internal-Auth": [b"", KEY.encode()]}) == (401, UNAUTHORIZED)
    assert api.store.names() == ["queue_page"]


# --- Redis refusing because of its own state: 503 with the reason ------------------------------------


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/internal/cache/recache", b'{"host_id":1,"urls":["https://test.example.com/"],"priority":"high"}'),
    ("POST", "/internal/cache/invalidate", b'{"host_id":1,"urls":["https://test.example.com/"]}'),
    ("POST", "/internal/cache/invalidate-all", b'{"host_id":1}'),
    ("POST", "/internal/cache/deadletter/requeue", b'{"host_id":1}'),
    ("GET", "/internal/cache/urls?host_id=1", None),
    ("GET", "/internal/cache/queue?host_id=1", None),
])
def test_redis_out_of_memory_is_503_with_the_reason(api: Api, method: str, path: str, body: bytes | None) -> None:
    api.store.error = RedisError(OOM)
    assert api.json(method, path, body) == (503, refusal(f"redis out of memory: {OOM}"))
    scripted = RedisError(f"{OOM} script: b0e59eb6cc1801c4e89d52841f8df3eace8c14d6, on @user_script:19.")
    api.store.error = scripted
    assert api.json(method, path, body) == (503, refusal(f"redis out of memory: {OOM}"))
    loading = "LOADING Redis is loading the dataset in memory"
    api.store.error = RedisError(loading)
    assert api.json(method, path, body) == (503, refusal(f"redis unavailable: {loading}"))


def test_other_redis_errors_keep_their_answers(api: Api) -> None:
    api.store.error = RedisError("WRONGTYPE Operation against a key holding the wrong kind of value")
    assert api.json("GET", "/internal/cache/urls?host_id=1") == (500, refusal("internal error"))
    assert api.json("POST", "/internal/cache/invalidate-all", b'{"host_id":1}') == (
        500, refusal("internal error during invalidation"))
    api.store.error = RedisError("BUSY Redis is busy running a script.")
    assert api.json("GET", "/internal/cache/urls?host_id=1") == (503, refusal("redis busy, try again later"))


# --- a real ApiSite: what a connection may hold ------------------------------------------------------


def never(request: Request) -> Deferred[Any]:
    return Deferred()


def size(request: Request) -> bytes:
    return b'{"size":%d}' % len(query.content(request))


class Site:
    """An ``ApiSite`` of *settings* on 127.0.0.1:0 in the test reactor, with two test routes."""

    def __init__(self, settings: RecacheSettings) -> None:
        self.api = Api(settings, extra={(b"POST", b"/size"): size, (b"GET", b"/never"): never,
                                        (b"POST", b"/never"): never})
        self.site = api_site(settings, self.api.resource)
        self.port = global_reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.number = self.port.getHost().port

    async def close(self) -> None:
        await maybeDeferred(self.port.stopListening)


@pytest.fixture
def site_settings(settings: RecacheSettings) -> RecacheSettings:
    limits: dict[str, Any] = {"request_timeout": 1.0, "max_connections": 3}
    known = {f.name for f in dataclasses.fields(settings)}
    return dataclasses.replace(settings, **{k: v for k, v in limits.items() if k in known})


async def in_thread(work: Callable[[], Any], timeout: float = 20.0) -> Any:
    d = deferToThread(work)
    d.addTimeout(timeout, global_reactor)
    return await d


def client(port: int, head: bytes, drip: bytes = b"", every: float = 0.1, limit: float = 5.0,
           read_until: bytes | None = None) -> tuple[bytes, float | None]:
    """Send *head*, then *drip* one byte each *every* seconds; return what came back and when the
    server closed the connection (seconds from the connect), or ``None`` if still open after *limit*.
    With *read_until*, return as soon as that much of an answer arrived (the connection left open)."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        started = time.monotonic()
        got, sent = b"", 0
        if head:
            s.sendall(head)
        while time.monotonic() - started < limit:
            readable, _, _ = select.select([s], [], [], every)
            try:
                if readable:
                    chunk = s.recv(65536)
                    if not chunk:
                        return got, time.monotonic() - started
                    got += chunk
                    if read_until is not None and read_until in got:
                        return got, None
                elif sent < len(drip):
                    s.send(drip[sent : sent + 1])
                    sent += 1
            except (ConnectionResetError, BrokenPipeError):
                return got, time.monotonic() - started
        return got, None


def head(method: str, path: str, *lines: str, key: bool = True) -> bytes:
    fields = ["Host: cd.test", *([f"X-Internal-Auth: {KEY}"] if key else []), *lines]
    return f"{method} {path} HTTP/1.1\r\n".encode() + "".join(f"{f}\r\n" for f in fields).encode() + b"\r\n"


@pytest_twisted.ensureDeferred
async def test_unauthorised_body_is_refused_from_the_headers(site_settings: RecacheSettings) -> None:
    site = Site(site_settings)
    try:
        for lines in (["Content-Length: 50000000"], ["Transfer-Encoding: chunked"],
                      ["Content-Length: 900000", "Expect: 100-continue"]):
            for key_line in ([], ["X-Internal-Auth: wrong"], ["X-Internal-Auth: wrong", f"X-Internal-Auth: {KEY}"]):
                request = head("POST", "/internal/cache/recache", *key_line, *lines, key=False)
                got, closed = await in_thread(lambda r=request: client(site.number, r, limit=3.0))  # type: ignore[misc]
                assert got.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), (lines, key_line, got)
                assert got.endswith(b"\r\n\r\n" + UNAUTHORIZED) and b"100 Continue" not in got
                assert b"Content-Length: %d\r\n" % len(UNAUTHORIZED) in got and b"Connection: close" in got
                assert closed is not None and closed < 1.0  # at once, not at the deadline
        assert site.api.store.calls == []
        # Without a body, the resource answers 401 as before, and the connection stays usable.
        got, closed = await in_thread(lambda: client(site.number, head("GET", "/nope", key=False) * 2,
                                                     read_until=UNAUTHORIZED + b"HTTP", limit=3.0))
        assert got.count(UNAUTHORIZED) >= 1 and closed is None
        # The health probe needs no key, body or not.
        got, _ = await in_thread(lambda: client(site.number, head("GET", "/healthz", "Content-Length: 3", key=False)
                                                + b"abc", read_until=b'{"success":true}', limit=3.0))
        assert got.startswith(b"HTTP/1.1 200 ")
    finally:
        await site.close()


@pytest_twisted.ensureDeferred
async def test_bodies_are_kept_in_memory_never_spooled(site_settings: RecacheSettings,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def no_disk(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a request body went to a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)
    site = Site(site_settings)
    try:
        body = b"x" * 300_000  # twisted.web spools bodies of 100,000 bytes or more
        got, _ = await in_thread(lambda: client(site.number, head("POST", "/size", f"Content-Length: {len(body)}")
                                                + body, read_until=b'{"size":300000}', limit=3.0))
        assert got.startswith(b"HTTP/1.1 200 ")
        chunked = b"".join(b"%x\r\n%s\r\n" % (50_000, b"y" * 50_000) for _ in range(4)) + b"0\r\n\r\n"
        got, _ = await in_thread(lambda: client(site.number, head("POST", "/size", "Transfer-Encoding: chunked")
                                                + chunked, read_until=b'{"size":200000}', limit=3.0))
        assert got.startswith(b"HTTP/1.1 200 ")
        # Over max_body_size (1,000,000 here): 413 from the length alone.
        got, closed = await in_thread(lambda: client(site.number, head("POST", "/size", "Content-Length: 1000001"),
                                                     limit=3.0))
        assert got.startswith(b"HTTP/1.1 413 ") and closed is not None
    finally:
        await site.close()


@pytest_twisted.ensureDeferred
async def test_max_connections_refuses_new_ones_at_once(site_settings: RecacheSettings) -> None:
    settings = dataclasses.replace(site_settings, request_timeout=10.0)
    assert getattr(settings, "max_connections", None) == 3
    site = Site(settings)
    held: list[socket.socket] = []
    try:
        for _ in range(3):
            held.append(socket.create_connection(("127.0.0.1", site.number)))
        await deferLater(global_reactor, 0.2, lambda: None)
        assert site.site.connections == 3
        got, closed = await in_thread(lambda: client(site.number, head("GET", "/healthz"), limit=3.0))
        assert (got, closed is not None) == (b"", True) and closed < 1.0  # closed, not left hanging
        held.pop().close()
        await deferLater(global_reactor, 0.2, lambda: None)
        got, _ = await in_thread(lambda: client(site.number, head("GET", "/healthz"), read_until=b'{"success":true}'))
        assert got.startswith(b"HTTP/1.1 200 ")
    finally:
        for s in held:
            s.close()
        await site.close()


@pytest_twisted.ensureDeferred
async def test_slow_headers_slow_body_and_silence_end_at_request_timeout(site_settings: RecacheSettings) -> None:
    site = Site(site_settings)  # request_timeout 1s
    timed_out = b'{"success":false,"message":"request not received within request_timeout (1s)"}'
    try:
        # Headers a byte at a time (each byte used to restart the 60 s idle timer).
        slow_head = head("GET", "/internal/cache/queue?host_id=1")
        got, closed = await in_thread(lambda: client(site.number, slow_head[:5], drip=slow_head[5:], every=0.05))
        assert got.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and got.endswith(timed_out)
        assert closed is not None and 0.9 < closed < 2.0
        # A body a byte at a time.
        got, closed = await in_thread(lambda: client(site.number, head("POST", "/size", "Content-Length: 100"),
                                                     drip=b"x" * 100, every=0.05))
        assert got.startswith(b"HTTP/1.1 408 ") and closed is not None and 0.9 < closed < 2.0
        # A connection that sends nothing is closed too, without an answer.
        got, closed = await in_thread(lambda: client(site.number, b""))
        assert got == b"" and closed is not None and 0.9 < closed < 2.0
        assert site.api.store.calls == []
    finally:
        await site.close()


@pytest_twisted.ensureDeferred
async def test_handler_has_the_time_left_and_keep_alive_waits_between_requests(
        site_settings: RecacheSettings) -> None:
    site = Site(dataclasses.replace(site_settings, request_timeout=2.0))
    try:
        # The body takes 0.5 s to arrive: the handler that never answers gets the 1.5 s left, then 503.
        for request, drip in ((head("POST", "/never", "Content-Length: 10"), b"x" * 10),
                              (head("GET", "/never")[:-2], b"X: abcd\r\n\r\n")):  # the headers' end in 0.5 s
            started = time.monotonic()
            got, _ = await in_thread(lambda r=request, d=drip: client(  # type: ignore[misc]
                site.number, r, drip=d, every=0.05, read_until=b"Redis"))
            elapsed = time.monotonic() - started
            assert got.startswith(b"HTTP/1.1 503 ") and b"request timed out waiting for Redis" in got
            assert 1.9 < elapsed < 2.4, elapsed  # 2.5 s when the handler had request_timeout of its own
        # Between requests the deadline is off: a kept-alive connection idle past request_timeout still serves.

        def two_requests() -> bytes:
            with socket.create_connection(("127.0.0.1", site.number), timeout=5) as s:
                s.sendall(head("GET", "/healthz"))
                first = s.recv(65536)
                time.sleep(2.5)
                s.sendall(head("GET", "/healthz"))
                return first + s.recv(65536)

        both = await in_thread(two_requests)
        assert both.count(b"HTTP/1.1 200 ") == 2
    finally:
        await site.close()
