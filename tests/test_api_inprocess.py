"""The Cache Daemon API in-process: ``api_resource`` driven by ``treq.testing.StubTreq``.

Most tests use in-memory doubles of the store and ledger (they record every call, so a test also
sees what was *not* done: no Redis work on a 401 or a 400). The queue listing and the enqueue are
also run against the suite's real redis-server, through a real ``RedisClient`` and a real site on
port 0 in the test reactor, because their paging and member bytes live partly in Lua.

Expected messages are written out from ../shared/specs/edgecomet-cd.md (section 2 and the
acceptance cases of section 8), not imported from the code under test.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from treq.testing import StubTreq
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cachesvc import config
from cachesvc.api.routes import api_resource, api_site
from cachesvc.recache.discovery import Discovery
from cachesvc.recache.keys import PRIORITIES, RS_REGISTRY
from cachesvc.recache.ledger import Budget, Ledger
from cachesvc.recache.pubsub import RedisPubSub
from cachesvc.recache.redisclient import RedisClient, RedisUnavailable
from cachesvc.recache.registry import format_go_time
from cachesvc.recache.settings import RecacheSettings
from cachesvc.recache.state import SchedulerState
from cachesvc.recache.store import Enqueued, QueueCount, QueueEntry, QueuePage, Store

KEY = "test-internal-auth-key"
NOW = 1767225600.0  # 2026-01-01T00:00:00Z
UNAUTHORIZED = b'{"success":false,"message":"unauthorized"}'
NOT_FOUND = b'{"success":false,"message":"not found"}'
ROUTES = [
    (b"POST", "/internal/cache/recache"), (b"POST", "/internal/cache/invalidate"),
    (b"POST", "/internal/cache/invalidate-all"), (b"GET", "/status"), (b"GET", "/internal/cache/urls"),
    (b"GET", "/internal/cache/summary"), (b"GET", "/internal/cache/queue"), (b"GET", "/internal/cache/queue/summary"),
    (b"GET", "/internal/cache/deadletter"), (b"POST", "/internal/cache/deadletter/requeue"),
    (b"POST", "/internal/scheduler/pause"), (b"POST", "/internal/scheduler/resume"),
]
_sync = SynchronousTestCase()


# --- settings, doubles ---------------------------------------------------------------------------


def write_settings(tmp_path: Path, redis_addr: str = "127.0.0.1:1") -> RecacheSettings:
    (tmp_path / "hosts.d").mkdir(exist_ok=True)
    (tmp_path / "hosts.d" / "a.yaml").write_text(
        "hosts:\n"
        "  - id: 1\n    domain: [test.example.com, www.test.example.com]\n"
        "    dimensions:\n      desktop: {id: 1}\n      mobile: {id: 2}\n"
        "      blocked_bots: {id: 3, action: block, match_ua: ['*BadBot*']}\n"
        "  - id: 2\n    domain: two.example\n"
        "  - id: 10\n    domain: ten.example\n")
    (tmp_path / "edge-gateway.yaml").write_text(f"internal: {{auth_key: {KEY}}}\nhosts: {{include: hosts.d}}\n")
    conf = tmp_path / "cd.yaml"
    conf.write_text(
        f"eg_config: edge-gateway.yaml\ndaemon_id: cd-test\nredis: {{addr: '{redis_addr}'}}\n"
        "internal_queue: {max_size: 1000}\nrecache: {rs_capacity_reserved: 0.30, high_queue_limit: 1000}\n"
        "http_api: {request_timeout: 5s}\n")
    resolved = config.resolve(str(conf)).recache
    assert resolved is not None
    return resolved


def rs(rs_id: str, capacity: int, load: int, seen: float) -> bytes:
    return json.dumps({"id": rs_id, "capacity": capacity, "load": load, "last_seen": format_go_time(seen)}).encode()


class FakeStore:
    """The store operations the API calls, in memory; ``queues[(host, priority)]`` is a list of (member, score)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.queues: dict[tuple[int, str], list[tuple[bytes, bytes]]] = {}
        self.counts: dict[int, dict[str, QueueCount]] = {}
        self.dead: dict[int, int] = {}
        self.render_services: list[bytes] = []
        self.enqueue_answer: Enqueued | None = None
        self.ping_error: Exception | None = None

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def ping(self) -> Deferred[Any]:
        self._record("ping")
        return fail(self.ping_error) if self.ping_error else succeed(b"PONG")

    def enqueue(self, host_id: int, priority: str, members: list[bytes], score: int, limit: int) -> Deferred[Enqueued]:
        self._record("enqueue", host_id, priority, list(members), score, limit)
        return succeed(self.enqueue_answer or Enqueued(True, len(members), 0))

    def queue_counts(self, host_ids: list[int], now: int) -> Deferred[dict[int, dict[str, QueueCount]]]:
        self._record("queue_counts", list(host_ids), now)
        return succeed({h: self.counts.get(h, {p: QueueCount(0, 0) for p in PRIORITIES}) for h in host_ids})

    def deadletter_counts(self, host_ids: list[int]) -> Deferred[dict[int, int]]:
        self._record("deadletter_counts", list(host_ids))
        return succeed({h: self.dead.get(h, 0) for h in host_ids})

    def registry_values(self, pattern: str) -> Deferred[list[bytes]]:
        self._record("registry_values", pattern)
        return succeed(list(self.render_services) if pattern == RS_REGISTRY else [])

    def queue_page(self, host_id: int, priorities: list[str], offset: int, size: int) -> Deferred[QueuePage]:
        """queue_page.lua's contract: the listed queues one after another, each in score order."""
        self._record("queue_page", host_id, list(priorities), offset, size)
        combined = [QueueEntry(p, m, s) for p in priorities
                    for m, s in sorted(self.queues.get((host_id, p), []), key=lambda e: float(e[1]))]
        return succeed(QueuePage(len(combined), combined[offset:offset + size]))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class FakeRegistry:
    """The registry watcher as /status reads it: the store double's Render Services."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store

    def render_services(self, catch_up: bool = False) -> Deferred[list[bytes]]:
        return self.store.registry_values(RS_REGISTRY)

    def describe(self) -> dict[str, Any]:
        return {"mode": "notifications"}


class FakeLedger:
    def __init__(self, budget: Budget) -> None:
        self.answer = budget
        self.asked: list[tuple[int, int, float]] = []

    def budget(self, line: int, load: int, snapshot: float) -> Deferred[Budget]:
        self.asked.append((line, load, snapshot))
        return succeed(self.answer)


class Api:
    """The resource with its doubles, and a way to call it."""

    def __init__(self, settings: RecacheSettings, **overrides: Any) -> None:
        self.settings = dataclasses.replace(settings, **overrides)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = FakeStore()
        self.ledger = FakeLedger(Budget(budget=13, unreflected=1, online=20, in_flight=4))
        self.state = SchedulerState(started_at=NOW - 90.5, max_size=self.settings.max_size)
        self.resource = api_resource(self.settings, self.store, self.ledger, self.state, self.clock,  # type: ignore[arg-type]
                                     metrics=None, compute=lambda work: maybeDeferred(work),
                                     registry=FakeRegistry(self.store))
        self.stub = StubTreq(self.resource)

    def call(self, method: bytes, path: str, body: bytes | dict[str, Any] | None = None, key: str | None = KEY,
             headers: dict[bytes, bytes] | None = None) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        sent = dict(headers or {})
        if key is not None:
            sent[b"X-Internal-Auth"] = key.encode()
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        d = self.stub.request(method.decode(), "http://cd.test" + path, data=data, headers=sent)
        self.stub.flush()
        response = _sync.successResultOf(d)
        content = self.stub.content(response)
        self.stub.flush()
        raw = _sync.successResultOf(content)
        return response.code, dict(response.headers.getAllRawHeaders()), raw

    def json(self, method: bytes, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        code, _, raw = self.call(method, path, body, **kwargs)
        return code, json.loads(raw)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> RecacheSettings:
    return write_settings(tmp_path_factory.mktemp("api-settings"))


@pytest.fixture
def api(settings: RecacheSettings) -> Api:
    return Api(settings)


# --- auth and routing ----------------------------------------------------------------------------


UNKNOWN = [(b"GET", "/nope"), (b"GET", "/"), (b"POST", "/healthz"), (b"GET", "/status/"), (b"DELETE", "/status"),
           (b"GET", "/internal/cache/recache"), (b"PUT", "/internal/cache/queue")]


@pytest.mark.parametrize("method, path", ROUTES + UNKNOWN)
@pytest.mark.parametrize("key", [None, "", "wrong", KEY[:-1], KEY + "x", KEY.upper()])
def test_every_path_needs_the_key(api: Api, method: bytes, path: str, key: str | None) -> None:
    headers = {b"X-Internal-Auth": b""} if key == "" else None
    code, got_headers, body = api.call(method, path, b'{"host_id":1,"urls":["https://test.example.com/"]}',
                                       key=key or None, headers=headers)
    assert (code, body) == (401, UNAUTHORIZED)
    assert got_headers[b"Content-Type"] == [b"application/json"]
    assert api.store.calls == [] and api.ledger.asked == [] and api.state.paused is False


def test_header_name_is_case_insensitive(api: Api) -> None:
    code, _, _ = api.call(b"GET", "/status", key=None, headers={b"x-internal-auth": KEY.encode()})
    assert code == 200


def test_healthz_needs_no_key_and_reports_redis(api: Api) -> None:
    assert api.call(b"GET", "/healthz", key=None)[::2] == (200, b'{"success":true}')
    down = "Redis at x did not answer PING within 3s"
    api.store.ping_error = RedisUnavailable(down)
    code, _, body = api.call(b"GET", "/healthz", key=None)
    assert (code, json.loads(body)) == (503, {"success": False, "message": f"redis unavailable: {down}"})


@pytest.mark.parametrize("method, path", UNKNOWN + [(b"GET", p + "/") for _, p in ROUTES]
                         + [(b"GET" if m == b"POST" else b"POST", p) for m, p in ROUTES])
def test_wrong_method_trailing_slash_and_unknown_paths_are_404(api: Api, method: bytes, path: str) -> None:
    code, got_headers, body = api.call(method, path, b"{}")
    assert (code, body) == (404, NOT_FOUND)
    assert got_headers[b"Content-Type"] == [b"application/json"]
    assert api.store.calls == []


# --- recache: validation -------------------------------------------------------------------------


def recache_body(**fields: Any) -> dict[str, Any]:
    body = {"host_id": 1, "urls": ["https://test.example.com/page1"], "dimension_ids": [1], "priority": "high"}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


@pytest.mark.parametrize(
    "body, message",
    [
        ({"host_id": 0, "urls": [], "priority": "x"}, "host_id is required"),  # validation order
        (recache_body(host_id=...), "host_id is required"),
        (recache_body(host_id=0), "host_id is required"),
        (recache_body(urls=[]), "urls array cannot be empty"),
        (recache_body(urls=None), "urls array cannot be empty"),
        (recache_body(urls=...), "urls array cannot be empty"),
        (recache_body(urls=["https://test.example.com/x"] * 10001), "urls array cannot exceed 10000 entries"),
        (recache_body(urls=[], priority="x"), "urls array cannot be empty"),
        (recache_body(priority="urgent"), "priority must be 'high' or 'normal'"),
        (recache_body(priority="HIGH"), "priority must be 'high' or 'normal'"),
        (recache_body(priority="autorecache"), "priority must be 'high' or 'normal'"),
        (recache_body(priority=...), "priority must be 'high' or 'normal'"),
        (recache_body(host_id=999, priority="x"), "priority must be 'high' or 'normal'"),
        (recache_body(host_id=999), "host_id 999 not found"),
        (recache_body(host_id=-1), "host_id -1 not found"),
        (recache_body(host_id=999, dimension_ids=[999]), "host_id 999 not found"),
        (recache_body(dimension_ids=[3]), "dimension_id 3 not configured for host 'test.example.com'"),
        (recache_body(dimension_ids=[1, 999]), "dimension_id 999 not configured for host 'test.example.com'"),
        (recache_body(host_id=2, dimension_ids=[1]), "dimension_id 1 not configured for host 'two.example'"),
    ],
)
def test_recache_refusals(api: Api, body: dict[str, Any], message: str) -> None:
    code, _, raw = api.call(b"POST", "/internal/cache/recache", body)
    assert code == 400
    assert raw == json.dumps({"success": False, "message": message}, separators=(",", ":")).encode()
    assert "enqueue" not in api.store.names()


@pytest.mark.parametrize("data", [b"{invalid json}", b"", b'{"host_id":"1","urls":["https://test.example.com/"]}',
                                  b'{"host_id":1,"urls":"https://test.example.com/"}'])
def test_recache_bad_json(api: Api, data: bytes) -> None:
    code, answer = api.json(b"POST", "/internal/cache/recache", data)
    assert code == 400 and answer["success"] is False and answer["message"].startswith("invalid json: ")
    assert api.store.calls == []


def test_recache_null_body_fails_the_first_required_field(api: Api) -> None:
    answer = api.json(b"POST", "/internal/cache/recache", b"null")
    assert answer == (400, {"success": False, "message": "host_id is required"})
    assert api.store.calls == []


# --- recache: what is enqueued -------------------------------------------------------------------


def test_recache_enqueues_exactly_one_member_per_url_and_dimension(api: Api) -> None:
    body = {"host_id": 1, "priority": "high", "dimension_ids": [2, 1],
            "urls": ["https://test.example.com/page?b=2&a=1", "not-a-valid-url", "HTTPS://TEST.EXAMPLE.COM:443/x#top"]}
    code, _, raw = api.call(b"POST", "/internal/cache/recache", body)
    assert code == 200
    assert raw == (b'{"success":true,"data":{"host_id":1,"urls_count":3,"dimension_ids_count":2,'
                   b'"entries_enqueued":4,"priority":"high"}}')
    [(name, (host_id, priority, members, score, limit))] = api.store.calls
    assert (name, host_id, priority, score, limit) == ("enqueue", 1, "high", int(NOW), 1000)
    assert members == [
        b'{"url":"https://test.example.com/page?a=1\\u0026b=2","dimension_id":2}',
        b'{"url":"https://test.example.com/page?a=1\\u0026b=2","dimension_id":1}',
        b'{"url":"https://test.example.com/x","dimension_id":2}',
        b'{"url":"https://test.example.com/x","dimension_id":1}',
    ]


def test_recache_without_dimensions_means_every_one_that_renders(api: Api) -> None:
    code, answer = api.json(b"POST", "/internal/cache/recache", recache_body(dimension_ids=..., priority="normal"))
    assert code == 200 and answer["data"]["dimension_ids_count"] == 3 and answer["data"]["priority"] == "normal"
    [(_, (_, priority, members, _, limit))] = api.store.calls
    assert (priority, limit) == ("normal", 0)  # the cap is only for the high queue
    assert members == [b'{"url":"https://test.example.com/page1","dimension_id":%d}' % d for d in (0, 1, 2)]


def test_recache_accepts_10000_urls(api: Api) -> None:
    urls = [f"https://test.example.com/p{i}" for i in range(10000)]
    code, answer = api.json(b"POST", "/internal/cache/recache", recache_body(urls=urls))
    assert code == 200 and answer["data"]["entries_enqueued"] == 10000
    [(_, (_, _, members, _, _))] = api.store.calls
    assert len(members) == 10000 and members[9999] == b'{"url":"https://test.example.com/p9999","dimension_id":1}'


def test_recache_over_the_high_queue_cap_is_429_and_says_so(api: Api) -> None:
    api.store.enqueue_answer = Enqueued(False, 0, 5)
    urls = [f"https://test.example.com/{i}" for i in range(9)]
    code, answer = api.json(b"POST", "/internal/cache/recache", recache_body(urls=urls))
    assert code == 429
    assert answer == {"success": False, "message": "high priority queue for host 1 is full: 5 of 1000 entries free, "
                                                   "this request needs more; nothing was enqueued"}


# --- queue listing -------------------------------------------------------------------------------


def member(url: str, dim: int) -> bytes:
    return b'{"url":"%s","dimension_id":%d}' % (url.encode(), dim)


QUEUE_DATA = {  # entries given out of score order: the listing sorts each queue by score
    "high": [(member("https://test.example.com/h2", 1), b"200"), (member("https://test.example.com/h1", 2), b"100"),
             (member("https://test.example.com/h3", 99), b"300")],
    "normal": [(member("https://test.example.com/n1", 0), b"150"), (member("https://test.example.com/n2", 1), b"160")],
    "autorecache": [(member("https://test.example.com/a1", 1), b"50"),
                    (member("https://test.example.com/a2", 2), b"9999999999")],
}
ALL_IN_ORDER = [("h1", "mobile", "high", 100), ("h2", "desktop", "high", 200), ("h3", "unknown", "high", 300),
                ("n1", "bypass", "normal", 150), ("n2", "desktop", "normal", 160),
                ("a1", "desktop", "autorecache", 50), ("a2", "mobile", "autorecache", 9999999999)]


def item(name: str, dimension: str, priority: str, score: int) -> dict[str, Any]:
    return {"url": f"https://test.example.com/{name}", "dimension": dimension, "priority": priority,
            "scheduled_at": score}


def check_queue_listing(get: Callable[[str], tuple[int, Any]]) -> None:
    """The listing's contract, run against the in-memory store and against real Redis."""
    code, answer = get("/internal/cache/queue?host_id=1&limit=2")
    assert code == 200 and answer["success"] is True
    assert answer["data"] == {"items": [item(*e) for e in ALL_IN_ORDER[:2]], "cursor": "2", "has_more": True}
    # A page that crosses from one priority into the next, with more after it.
    _, answer = get("/internal/cache/queue?host_id=1&limit=3&cursor=2")
    assert answer["data"] == {"items": [item(*e) for e in ALL_IN_ORDER[2:5]], "cursor": "5", "has_more": True}
    # The last page: has_more from the total across every priority, cursor "0".
    _, answer = get("/internal/cache/queue?host_id=1&limit=2&cursor=5")
    assert answer["data"] == {"items": [item(*e) for e in ALL_IN_ORDER[5:7]], "cursor": "0", "has_more": False}
    _, answer = get("/internal/cache/queue?host_id=1&limit=3&cursor=6")
    assert answer["data"] == {"items": [item(*ALL_IN_ORDER[6])], "cursor": "0", "has_more": False}
    # Walking every page returns every entry once, in order.
    seen, cursor = [], "0"
    while True:
        _, answer = get(f"/internal/cache/queue?host_id=1&limit=3&cursor={cursor}")
        seen += answer["data"]["items"]
        cursor = answer["data"]["cursor"]
        if not answer["data"]["has_more"]:
            break
    assert seen == [item(*e) for e in ALL_IN_ORDER]
    # The filter's order is the listing's order.
    _, answer = get("/internal/cache/queue?host_id=1&priority=autorecache,high")
    assert [i["url"][-2:] for i in answer["data"]["items"]] == ["a1", "a2", "h1", "h2", "h3"]
    assert answer["data"]["has_more"] is False and answer["data"]["cursor"] == "0"
    _, answer = get("/internal/cache/queue?host_id=1&priority=normal&limit=1")
    assert answer["data"] == {"items": [item(*ALL_IN_ORDER[3])], "cursor": "1", "has_more": True}
    # Past the end, and a cursor that is not a number (Go: 0).
    _, answer = get("/internal/cache/queue?host_id=1&cursor=50")
    assert answer["data"] == {"items": [], "cursor": "0", "has_more": False}
    _, answer = get("/internal/cache/queue?host_id=1&limit=1&cursor=abc")
    assert answer["data"]["items"] == [item(*ALL_IN_ORDER[0])]
    # An empty host.
    _, answer = get("/internal/cache/queue?host_id=2")
    assert answer["data"] == {"items": [], "cursor": "0", "has_more": False}


def test_queue_listing_pages(api: Api) -> None:
    for priority, entries in QUEUE_DATA.items():
        api.store.queues[(1, priority)] = entries
    check_queue_listing(lambda path: api.json(b"GET", path))
    pages = [args for name, args in api.store.calls if name == "queue_page"]
    assert pages[0] == (1, ["high", "normal", "autorecache"], 0, 2)  # only the page is asked for
    assert (1, ["autorecache", "high"], 0, 25) in pages


@pytest.mark.parametrize(
    "query, code, message",
    [
        ("priority=urgent", 400, "invalid priority filter: urgent"),
        ("priority=high,bogus", 400, "invalid priority filter: bogus"),
        ("limit=0&priority=bogus", 400, "limit must be between 1 and 100"),  # limit is checked first
        ("limit=101", 400, "limit must be between 1 and 100"),
        ("limit=abc", 400, "limit must be a valid integer"),
        ("host_id=", 400, "host_id is required"),
        ("host_id=0", 400, "host_id is required"),
        ("host_id=abc", 400, "host_id must be a valid integer"),
        ("host_id=999", 404, "host_id 999 not found"),
    ],
)
def test_queue_listing_refusals(api: Api, query: str, code: int, message: str) -> None:
    path = f"/internal/cache/queue?{query}" if "host_id" in query else f"/internal/cache/queue?host_id=1&{query}"
    assert api.json(b"GET", path) == (code, {"success": False, "message": message})
    assert api.store.calls == []


# --- /status -------------------------------------------------------------------------------------


def test_status_shape_and_the_budget_from_the_ledger(api: Api) -> None:
    api.store.render_services = [rs("rs-1", 100, 20, NOW - 1), rs("rs-2", 50, 10, NOW - 2), rs("old", 500, 0, NOW - 5)]
    api.store.counts = {1: {"high": QueueCount(3, 2), "normal": QueueCount(1, 1), "autorecache": QueueCount(5, 0)}}
    api.store.dead = {2: 7}
    api.state.last_tick = NOW - 0.4
    api.state.in_flight = {1: 3, 2: 1}
    code, headers, raw = api.call(b"GET", "/status")
    assert code == 200 and headers[b"Content-Type"] == [b"application/json"]
    # The line is (1 - 0.30) x 150 = 105, the load 30, the snapshot the oldest healthy sighting; rs "old" is stale.
    assert api.ledger.asked == [(105, 30, NOW - 2)]
    zero = b'{"total":0,"due_now":0}'
    assert raw == (
        b'{"daemon":{"daemon_id":"cd-test","uptime_seconds":90,"last_tick":"2025-12-31T23:59:59Z",'
        b'"discovery":{"mode":"notifications"}},'
        b'"internal_queue":{"size":4,"max_size":1000,"capacity_used_percent":0.4},'
        b'"rs_capacity":{"total_free_tabs":120,"reserved_for_online":36,"available_for_recache":84,'
        b'"reservation_percent":30,"capacity_line":105,"recache_budget":13,"in_flight":4},'
        b'"queues":{"1":{"high":{"total":3,"due_now":2},"normal":{"total":1,"due_now":1},'
        b'"autorecache":{"total":5,"due_now":0},"dead_letter":0},'
        b'"10":{"high":' + zero + b',"normal":' + zero + b',"autorecache":' + zero + b',"dead_letter":0},'
        b'"2":{"high":' + zero + b',"normal":' + zero + b',"autorecache":' + zero + b',"dead_letter":7}}}'
    )
    assert list(json.loads(raw)) == ["daemon", "internal_queue", "rs_capacity", "queues"]


def test_status_before_the_first_tick_and_a_negative_budget(api: Api) -> None:
    api.ledger.answer = Budget(budget=-6, unreflected=0, online=40, in_flight=9)
    _, answer = api.json(b"GET", "/status")
    assert answer["daemon"]["last_tick"] == "0001-01-01T00:00:00Z"
    assert answer["rs_capacity"] == {"total_free_tabs": 0, "reserved_for_online": 0, "available_for_recache": 0,
                                     "reservation_percent": 30, "capacity_line": 0, "recache_budget": 0, "in_flight": 9}
    assert api.ledger.asked == [(0, 0, NOW)]


def test_status_when_redis_is_down_is_503(api: Api) -> None:
    down = "Redis at x did not answer EVALSHA within 3s"
    api.store.queue_counts = lambda *a: fail(RedisUnavailable(down))  # type: ignore[method-assign]
    code, answer = api.json(b"GET", "/status")
    assert (code, answer) == (503, {"success": False, "message": f"redis unavailable: {down}"})


# --- pause / resume ------------------------------------------------------------------------------


def test_pause_and_resume_are_403_unless_enabled(api: Api) -> None:
    assert api.settings.scheduler_control_api is False
    for path in ("/internal/scheduler/pause", "/internal/scheduler/resume"):
        code, _, raw = api.call(b"POST", path)
        assert (code, raw) == (403, b'{"success":false,"message":"Scheduler control API not enabled"}')
    assert api.state.paused is False
    api.state.paused = True
    api.call(b"POST", "/internal/scheduler/resume")
    assert api.state.paused is True


def test_pause_and_resume_toggle_the_shared_state(settings: RecacheSettings) -> None:
    api = Api(settings, scheduler_control_api=True)
    paused = b'{"success":true,"message":"Scheduler paused"}'
    resumed = b'{"success":true,"message":"Scheduler resumed"}'
    assert api.call(b"POST", "/internal/scheduler/pause")[::2] == (200, paused)
    assert api.state.paused is True
    assert api.call(b"POST", "/internal/scheduler/pause")[::2] == (200, paused)
    assert api.state.paused is True
    assert api.call(b"POST", "/internal/scheduler/resume")[::2] == (200, resumed)
    assert api.state.paused is False
    assert api.store.calls == []


# --- against the suite's real redis-server -------------------------------------------------------


class RealApi:
    """api_resource over a real Store and Ledger, served on 127.0.0.1:0 in the test reactor."""

    def __init__(self, tmp_path: Path, redis_addr: str) -> None:
        self.settings = write_settings(tmp_path, redis_addr)
        self.redis = RedisClient(redis_addr, "", 0, global_reactor, timeout=3.0)
        self.store = Store(self.redis)
        self.ledger = Ledger(self.redis, "cd-test", self.settings.lease, global_reactor)
        self.state = SchedulerState(started_at=global_reactor.seconds(), max_size=self.settings.max_size)
        self.registry = Discovery(self.store, RedisPubSub(redis_addr, "", 0, global_reactor), 0, global_reactor)
        self.registry.startService()
        resource = api_resource(self.settings, self.store, self.ledger, self.state, global_reactor,
                                compute=lambda work: maybeDeferred(work), registry=self.registry)
        self.port = global_reactor.listenTCP(0, api_site(self.settings, resource), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    async def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        d = treq.request(method, self.base + path, data=data, headers={b"X-Internal-Auth": KEY.encode()},
                         persistent=False)
        d.addTimeout(5, global_reactor)
        response = await d
        content = treq.content(response)
        content.addTimeout(5, global_reactor)
        return response.code, json.loads(await content)

    async def close(self) -> None:
        await maybeDeferred(self.port.stopListening)
        await maybeDeferred(self.registry.stopService)
        await maybeDeferred(self.redis.stopService)


@pytest_twisted.ensureDeferred
async def test_real_redis_recache_enqueues_the_member_bytes(tmp_path: Path, redis: Any, redis_server: Any) -> None:
    real = RealApi(tmp_path, redis_server.addr)
    try:
        body = {"host_id": 1, "priority": "high", "dimension_ids": [1, 2],
                "urls": ["https://test.example.com/page?b=2&a=1", "https://test.example.com/page?a=1&b=2"]}
        code, answer = await real.json("POST", "/internal/cache/recache", body)
        assert code == 200 and answer["data"]["entries_enqueued"] == 4
        stored = redis.zrange("recache:1:high", 0, -1, withscores=True)
        assert sorted(m for m, _ in stored) == [b'{"url":"https://test.example.com/page?a=1\\u0026b=2","dimension_id":1}',
                                                b'{"url":"https://test.example.com/page?a=1\\u0026b=2","dimension_id":2}']
        assert all(abs(score - global_reactor.seconds()) < 5 for _, score in stored)
        assert redis.exists("recache:1:normal") == 0
    finally:
        await real.close()


@pytest_twisted.ensureDeferred
async def test_real_redis_queue_listing_pages(tmp_path: Path, redis: Any, redis_server: Any) -> None:
    for priority, entries in QUEUE_DATA.items():
        redis.zadd(f"recache:1:{priority}", {m: float(s) for m, s in entries})
    real = RealApi(tmp_path, redis_server.addr)
    try:
        answers: dict[str, tuple[int, Any]] = {}
        paths = ["/internal/cache/queue?host_id=1&limit=2", "/internal/cache/queue?host_id=1&limit=3&cursor=2",
                 "/internal/cache/queue?host_id=1&limit=2&cursor=5", "/internal/cache/queue?host_id=1&limit=3&cursor=6",
                 "/internal/cache/queue?host_id=1&limit=3&cursor=0", "/internal/cache/queue?host_id=1&limit=3&cursor=3",
                 "/internal/cache/queue?host_id=1&priority=autorecache,high",
                 "/internal/cache/queue?host_id=1&priority=normal&limit=1", "/internal/cache/queue?host_id=1&cursor=50",
                 "/internal/cache/queue?host_id=1&limit=1&cursor=abc", "/internal/cache/queue?host_id=2"]
        for path in paths:  # fetched first: check_queue_listing is synchronous
            answers[path] = await real.json("GET", path)
        check_queue_listing(lambda path: answers[path])
    finally:
        await real.close()


@pytest_twisted.ensureDeferred
async def test_real_redis_status_budget_is_the_claim_scripts(tmp_path: Path, redis: Any, redis_server: Any) -> None:
    now = global_reactor.seconds()
    redis.set("service:render:rs-1", rs("rs-1", 100, 20, now))
    real = RealApi(tmp_path, redis_server.addr)
    try:
        code, answer = await real.json("GET", "/status")
        assert code == 200 and list(answer) == ["daemon", "internal_queue", "rs_capacity", "queues"]
        # line 70, online load 20, nothing in flight: the claim script's budget is 50.
        assert answer["rs_capacity"]["capacity_line"] == 70
        assert answer["rs_capacity"]["recache_budget"] == 50 and answer["rs_capacity"]["in_flight"] == 0
        budget = await real.ledger.budget(70, 20, now)
        assert budget.budget == 50
    finally:
        await real.close()
