"""The Cache Daemon API end to end: ``twistd ... cachesvc --config`` in a subprocess, real Redis, real HTTP.

Numbers in test names are the acceptance cases of ../shared/specs/edgecomet-cd.md section 8.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from prometheus_client.parser import text_string_to_metric_families

from cachesvc.recache.members import encode_member
from cachesvc.recache.urlnorm import normalize, url_hash
from harness.daemon import Daemon, free_port, wait_until
from harness.fake_eg import FakeEG
from harness.redis_server import RedisServer

KEY = "test-internal-auth-key"
HOSTS = """hosts:
  - id: 1
    domain: "test.example.com"
    render_key: "test-render-key"
    enabled: true
    dimensions:
      desktop: {id: 1, width: 1920, height: 1080, render_ua: desktop}
      mobile: {id: 2, width: 375, height: 667, render_ua: mobile}
      blocked_bots: {id: 3, action: block, match_ua: ["*BadBot*"]}
  - id: 10
    domain: ["ten.example.com", "www.ten.example.com"]
"""
EG = f"""eg_id: test-eg
internal: {{listen: "localhost:9999", auth_key: "{KEY}"}}
server: {{listen: ":9998"}}
render: {{cache: {{ttl: 1h, expired: {{strategy: serve_stale, stale_ttl: 60s}}}}}}
cache_sharding: {{enabled: true}}
hosts: {{include: hosts.d}}
"""


def write_configs(base: Path, redis_addr: str, port: int, extra_api: str = "", extra: str = "") -> Path:
    (base / "hosts.d").mkdir(exist_ok=True)
    (base / "hosts.d" / "01-test.yaml").write_text(HOSTS)
    (base / "edge-gateway.yaml").write_text(EG)
    conf = base / "cache-daemon.yaml"
    conf.write_text(
        f"""eg_config: edge-gateway.yaml
daemon_id: test-daemon
redis: {{addr: "{redis_addr}", password: "", db: 0}}
scheduler: {{tick_interval: 100ms, normal_check_interval: 6s}}
internal_queue: {{max_size: 1000, max_retries: 3, retry_base_delay: 100ms}}
recache: {{rs_capacity_reserved: 0.30, timeout_per_url: 60s}}
http_api:
  enabled: true
  listen: "127.0.0.1:{port}"
  request_timeout: 2s
  scheduler_control_api: true
  max_body_size: 2000000{extra_api}
{extra}"""
    )
    return conf


class Api:
    def __init__(self, port: int) -> None:
        self.port = port

    def __call__(self, method: str, path: str, body: Any = None, auth: str | None = KEY,
                 headers: dict[str, str] | None = None) -> tuple[int, Any, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            raw = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            h = dict(headers or {})
            if auth is not None:
                h["X-Internal-Auth"] = auth
            conn.request(method, path, body=raw, headers=h)
            response = conn.getresponse()
            data = response.read()
            response.raw_body = data  # type: ignore[attr-defined]
            try:
                parsed = json.loads(data) if data else None
            except ValueError:
                parsed = data
            return response.status, parsed, response
        finally:
            conn.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, redis_server) -> Iterator[Api]:
    base = tmp_path_factory.mktemp("api")
    port = free_port()
    conf = write_configs(base, redis_server.addr, port)
    proc = Daemon(["--config", str(conf)], base)
    try:
        proc.wait_for_port(port)
        yield Api(port)
    finally:
        proc.stop()


@pytest.fixture
def api(daemon: Api, redis) -> Api:
    return daemon


def now() -> int:
    return int(time.time())


# --- auth and routing ---------------------------------------------------------------------------


def test_01_02_unauthorized(api: Api, redis) -> None:
    status, body, response = api("GET", "/status", auth=None)
    assert (status, response.raw_body) == (401, b'{"success":false,"message":"unauthorized"}')
    assert response.getheader("Content-Type") == "application/json"
    status, _, _ = api(
        "POST",
        "/internal/cache/recache",
        {"host_id": 1, "urls": ["https://example.com/"], "priority": "high"},
        auth="wrong",
    )
    assert status == 401 and redis.keys("*") == []
    assert api("GET", "/status", auth="")[0] == 401
    assert api("GET", "/status", auth=KEY + "x")[0] == 401


def test_03_04_auth_before_routing_and_exact_routes(api: Api) -> None:
    assert api("GET", "/nope", auth=None)[0] == 401
    assert api("GET", "/nope")[:2] == (404, {"success": False, "message": "not found"})
    assert api("GET", "/internal/cache/recache")[:2] == (404, {"success": False, "message": "not found"})
    assert api("GET", "/status/")[0] == 404


def test_05_header_name_is_case_insensitive(api: Api) -> None:
    assert api("GET", "/status", auth=None, headers={"x-internal-auth": KEY})[0] == 200


def test_healthz_needs_no_key(api: Api) -> None:
    status, body, _ = api("GET", "/healthz", auth=None)
    assert (status, body) == (200, {"success": True})
    assert api("GET", "/healthz/", auth=None)[0] == 401  # only the bare probe is open


# --- recache ------------------------------------------------------------------------------------


def recache(api: Api, **body: Any) -> tuple[int, Any]:
    body.setdefault("host_id", 1)
    body.setdefault("priority", "high")
    status, data, _ = api("POST", "/internal/cache/recache", body)
    return status, data


def test_06_recache_high(api: Api, redis) -> None:
    before = now()
    status, body, response = api(
        "POST",
        "/internal/cache/recache",
        {
            "host_id": 1,
            "urls": ["https://example.com/page1", "https://example.com/page2"],
            "dimension_ids": [1, 2],
            "priority": "high",
        },
    )
    assert status == 200
    assert response.raw_body == (
        b'{"success":true,"data":{"host_id":1,"urls_count":2,"dimension_ids_count":2,'
        b'"entries_enqueued":4,"priority":"high"}}'
    )
    assert redis.zcard("recache:1:high") == 4
    for _, score in redis.zrange("recache:1:high", 0, -1, withscores=True):
        assert before - 1 <= score <= now() + 1


def test_07_08_member_bytes(api: Api, redis) -> None:
    assert recache(api, urls=["https://example.com/page1"], dimension_ids=[1])[0] == 200
    assert recache(api, urls=["https://example.com/page?b=2&a=1"], dimension_ids=[1])[0] == 200
    assert sorted(redis.zrange("recache:1:high", 0, -1)) == [
        b'{"url":"https://example.com/page1","dimension_id":1}',
        b'{"url":"https://example.com/page?a=1\\u0026b=2","dimension_id":1}',
    ]


@pytest.mark.parametrize("dims", [None, []])
def test_09_default_dimensions_exclude_block(api: Api, redis, dims) -> None:
    body: dict[str, Any] = {"urls": ["https://example.com/x"]}
    if dims is not None:
        body["dimension_ids"] = dims
    status, data = recache(api, **body)
    assert status == 200 and data["data"]["dimension_ids_count"] == 3 and data["data"]["entries_enqueued"] == 3
    assert sorted(json.loads(m)["dimension_id"] for m in redis.zrange("recache:1:high", 0, -1)) == [0, 1, 2]


def test_10_11_12_dimension_checks(api: Api, redis) -> None:
    assert recache(api, urls=["https://example.com/x"], dimension_ids=[3]) == (
        400,
        {"success": False, "message": "dimension_id 3 not configured for host 'test.example.com'"},
    )
    assert (
        recache(api, urls=["https://example.com/x"], dimension_ids=[999])[1]["message"]
        == "dimension_id 999 not configured for host 'test.example.com'"
    )
    assert redis.keys("*") == []
    status, data = recache(api, urls=["https://example.com/x"], dimension_ids=[0])
    assert status == 200 and redis.zrange("recache:1:high", 0, -1) == [b'{"url":"https://example.com/x","dimension_id":0}']


def test_13_normal_priority(api: Api, redis) -> None:
    status, data = recache(api, urls=["https://example.com/x"], dimension_ids=[1], priority="normal")
    assert status == 200 and data["data"]["priority"] == "normal"
    assert redis.zcard("recache:1:normal") == 1 and not redis.exists("recache:1:high")


@pytest.mark.parametrize(
    "body, message",
    [
        ({"host_id": 1, "urls": ["a.com"], "priority": "urgent"}, "priority must be 'high' or 'normal'"),
        ({"host_id": 1, "urls": ["a.com"], "priority": "HIGH"}, "priority must be 'high' or 'normal'"),
        ({"host_id": 1, "urls": ["a.com"], "priority": "autorecache"}, "priority must be 'high' or 'normal'"),
        ({"host_id": 1, "urls": ["a.com"]}, "priority must be 'high' or 'normal'"),
        ({"host_id": 0, "urls": ["a.com"], "priority": "high"}, "host_id is required"),
        ({"urls": ["a.com"], "priority": "high"}, "host_id is required"),
        ({"host_id": 999, "urls": ["a.com"], "priority": "high"}, "host_id 999 not found"),
        ({"host_id": -1, "urls": ["a.com"], "priority": "high"}, "host_id -1 not found"),
        ({"host_id": 1, "urls": [], "priority": "high"}, "urls array cannot be empty"),
        ({"host_id": 1, "priority": "high"}, "urls array cannot be empty"),
        ({"host_id": 1, "urls": None, "priority": "high"}, "urls array cannot be empty"),
        ({"host_id": 0, "urls": [], "priority": "x"}, "host_id is required"),
    ],
)
def test_14_15_16_19_validation(api: Api, redis, body: dict, message: str) -> None:
    status, data, _ = api("POST", "/internal/cache/recache", body)
    assert (status, data) == (400, {"success": False, "message": message})
    assert redis.keys("*") == []


def test_17_url_count_limit(api: Api, redis) -> None:
    urls = [f"https://example.com/p{i}" for i in range(10001)]
    assert recache(api, urls=urls, dimension_ids=[1])[1]["message"] == "urls array cannot exceed 10000 entries"
    # 10,000 URLs as normal priority (high is capped at 1,000 entries, see the cap tests)
    status, data = recache(api, urls=urls[:10000], dimension_ids=[1], priority="normal")
    assert status == 200 and data["data"]["entries_enqueued"] == 10000
    assert redis.zcard("recache:1:normal") == 10000


@pytest.mark.parametrize(
    "raw", [b"{invalid json}", b"", b'{"host_id":"1","urls":["a.com"],"priority":"high"}', b"[]", b"\xef\xbb\xbf{}"]
)
def test_18_20_invalid_json(api: Api, redis, raw: bytes) -> None:
    status, data, _ = api("POST", "/internal/cache/recache", raw)
    assert status == 400 and data["success"] is False and data["message"].startswith("invalid json: ")


def test_invalid_json_carries_gos_error_text(api: Api) -> None:
    status, data, _ = api("POST", "/internal/cache/recache", b'{"host_id":1} x')
    assert data["message"] == "invalid json: invalid character 'x' after top-level value"
    status, data, _ = api("POST", "/internal/cache/recache", b'{"host_id":1.5}')
    assert (
        data["message"]
        == "invalid json: json: cannot unmarshal number 1.5 into Go struct field RecacheAPIRequest.host_id of type int"
    )


def test_21_invalid_urls_are_skipped_but_counted(api: Api, redis) -> None:
    status, data = recache(api, urls=["not-a-valid-url", "https://example.com/valid"])
    assert status == 200 and data["data"]["urls_count"] == 2 and data["data"]["entries_enqueued"] == 3
    assert redis.zcard("recache:1:high") == 3


def test_22_variants_normalise_to_one_member(api: Api, redis) -> None:
    variants = ["https://example.com/page?b=2&a=1", "https://example.com/page?a=1&b=2", "HTTPS://EXAMPLE.COM/page?a=1&b=2",
                "https://example.com:443/page?a=1&b=2", "https://example.com/page?a=1&b=2#section",
                "https://example.com/page?a=1&b=2#top", "https://Example.com/page?b=2&a=1"]
    status, data = recache(api, urls=variants, dimension_ids=[1])
    assert data["data"]["urls_count"] == 7 and data["data"]["entries_enqueued"] == 7
    assert redis.zcard("recache:1:high") == 1


def test_23_resubmission_moves_the_score(api: Api, redis) -> None:
    recache(api, urls=["https://example.com/a"], dimension_ids=[1])
    [(_, first)] = redis.zrange("recache:1:high", 0, -1, withscores=True)
    time.sleep(1.1)
    recache(api, urls=["https://example.com/a"], dimension_ids=[1])
    [(_, second)] = redis.zrange("recache:1:high", 0, -1, withscores=True)
    assert second > first


def test_24_25_26(api: Api, redis) -> None:
    recache(api, urls=["https://example.com/a"], dimension_ids=[1])
    recache(api, urls=["https://example.com/a"], dimension_ids=[1], priority="normal")
    assert redis.zcard("recache:1:high") == 1 and redis.zcard("recache:1:normal") == 1
    status, data = recache(api, urls=["https://example.com/b"], dimension_ids=[1, 1])
    assert data["data"]["dimension_ids_count"] == 2 and data["data"]["entries_enqueued"] == 2
    assert redis.zcard("recache:1:high") == 2
    assert recache(api, urls=["https://other.org/x"], dimension_ids=[1])[0] == 200
    assert redis.zscore("recache:1:high", b'{"url":"https://other.org/x","dimension_id":1}') is not None


def test_high_queue_cap_is_atomic_and_says_what_is_free(api: Api, redis) -> None:
    urls = [f"https://example.com/p{i}" for i in range(990)]
    assert recache(api, urls=urls, dimension_ids=[1])[0] == 200
    status, data = recache(api, urls=[f"https://example.com/q{i}" for i in range(11)], dimension_ids=[1])
    assert status == 429 and "10 of 1000 entries free" in data["message"]
    assert redis.zcard("recache:1:high") == 990  # nothing of the refused request was added
    assert recache(api, urls=urls[:50], dimension_ids=[1])[0] == 200  # updates of queued entries need no room
    assert recache(api, urls=[f"https://example.com/q{i}" for i in range(10)], dimension_ids=[1])[0] == 200
    assert redis.zcard("recache:1:high") == 1000
    assert recache(api, urls=["https://example.com/one-more"], dimension_ids=[1], priority="normal")[0] == 200


# --- invalidate ---------------------------------------------------------------------------------


def meta(redis, host: int, dim: int, url: str, **fields: Any) -> str:
    key = f"meta:cache:{host}:{dim}:{url_hash(normalize(url))}"
    redis.hset(key, mapping={"url": url, **fields} if fields else {"url": url})
    return key


def test_27_28_30_31_invalidate(api: Api, redis) -> None:
    assert url_hash(normalize("https://example.com/test")) == "b64b434c9331e2b8"
    k1 = meta(redis, 1, 1, "https://example.com/test")
    k2 = meta(redis, 1, 2, "https://example.com/test")
    status, body, response = api(
        "POST",
        "/internal/cache/invalidate",
        {"host_id": 1, "urls": ["HTTPS://EXAMPLE.COM:443/test#x"], "dimension_ids": [1]},
    )
    assert (
        response.raw_body
        == b'{"success":true,"data":{"host_id":1,"urls_count":1,"dimension_ids_count":1,"entries_invalidated":1}}'
    )
    assert k1 == "meta:cache:1:1:b64b434c9331e2b8" and not redis.exists(k1) and redis.exists(k2)
    status, body, _ = api("POST", "/internal/cache/invalidate", {"host_id": 1, "urls": ["https://example.com/none"]})
    assert status == 200 and body["data"]["entries_invalidated"] == 0


def test_29_32_all_dimensions_and_queues_untouched(api: Api, redis) -> None:
    keys = [meta(redis, 1, d, "https://example.com/test") for d in (0, 1, 2, 3)]
    member = encode_member("https://example.com/test", 1)
    redis.zadd("recache:1:autorecache", {member: 123})
    status, body, _ = api("POST", "/internal/cache/invalidate", {"host_id": 1, "urls": ["https://example.com/test"]})
    assert body["data"]["entries_invalidated"] == 3 and body["data"]["dimension_ids_count"] == 3
    assert [redis.exists(k) for k in keys] == [0, 0, 0, 1]
    assert redis.zscore("recache:1:autorecache", member) == 123


def test_33_invalidate_validation(api: Api, redis) -> None:
    def post(body: Any) -> tuple[Any, ...]:
        return api("POST", "/internal/cache/invalidate", body)[:2]

    assert post({"host_id": 1, "urls": ["https://e.com/x"], "dimension_ids": [999]}) == (
        400,
        {"success": False, "message": "dimension_id 999 not configured for host 'test.example.com'"},
    )
    assert post({"host_id": 1, "urls": ["https://e.com/x"], "dimension_ids": [3]})[0] == 400
    assert post({"host_id": 999, "urls": ["https://e.com/x"]}) == (
        400,
        {"success": False, "message": "host_id 999 not found"},
    )
    assert post({"host_id": 1, "urls": []}) == (400, {"success": False, "message": "urls array cannot be empty"})
    assert post({"urls": ["a.com"]}) == (400, {"success": False, "message": "host_id is required"})
    many = [f"https://example.com/{i}" for i in range(10050)]
    status, body = post({"host_id": 1, "urls": many, "dimension_ids": [1]})
    assert status == 200 and body["data"]["urls_count"] == 10050


# --- invalidate-all -----------------------------------------------------------------------------


def test_34_to_39_invalidate_all(api: Api, redis) -> None:
    for key in ["meta:cache:1:0:h1", "meta:cache:1:1:h2", "meta:cache:1:2:h3", "meta:cache:2:1:x", "meta:cache:10:1:y"]:
        redis.hset(key, "url", "u")
    status, body, response = api("POST", "/internal/cache/invalidate-all", {"host_id": 1, "dimension_ids": [1]})
    assert body["data"] == {"host_id": 1, "dimension_ids_count": 1, "entries_invalidated": 1}
    assert not redis.exists("meta:cache:1:1:h2") and redis.exists("meta:cache:1:0:h1")
    status, body, _ = api("POST", "/internal/cache/invalidate-all", {"host_id": 1, "dimension_ids": [0]})
    assert body["data"]["entries_invalidated"] == 1 and not redis.exists("meta:cache:1:0:h1")
    for key in ["meta:cache:1:3:z", "meta:cache:1:99:z"]:
        redis.hset(key, "url", "u")
    status, body, response = api("POST", "/internal/cache/invalidate-all", {"host_id": 1})
    assert response.raw_body == b'{"success":true,"data":{"host_id":1,"dimension_ids_count":3,"entries_invalidated":3}}'
    assert redis.exists("meta:cache:2:1:x") and redis.exists("meta:cache:10:1:y")
    assert redis.keys("meta:cache:1:*") == []
    assert api("POST", "/internal/cache/invalidate-all", {"host_id": 1, "dimension_ids": [3]})[0] == 400
    assert api("POST", "/internal/cache/invalidate-all", {"host_id": 999})[:2] == (
        400,
        {"success": False, "message": "host_id 999 not found"},
    )
    assert api("POST", "/internal/cache/invalidate-all", {"host_id": 1})[1]["data"]["entries_invalidated"] == 0
    pipe = redis.pipeline()
    for i in range(2500):
        pipe.hset(f"meta:cache:1:{i % 3}:k{i}", "url", "u")
    pipe.execute()
    assert api("POST", "/internal/cache/invalidate-all", {"host_id": 1})[1]["data"]["entries_invalidated"] == 2500
    assert redis.keys("meta:cache:1:*") == []


# --- status -------------------------------------------------------------------------------------


def rs(redis, name: str, capacity: int, load: int, age: float = 0.0) -> None:
    seen = datetime.fromtimestamp(time.time() - age, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"
    redis.set(
        f"service:render:{name}",
        json.dumps(
            {"id": name, "address": "127.0.0.1", "port": 8080, "capacity": capacity, "load": load, "last_seen": seen}
        ),
        ex=60,
    )


def test_40_44_45_status(api: Api, redis) -> None:
    redis.zadd(
        "recache:1:autorecache",
        {
            b'{"url":"https://a.com/1","dimension_id":1}': 123456,
            b'{"url":"https://a.com/2","dimension_id":1}': 123457,
            b'{"url":"https://a.com/3","dimension_id":1}': now() + 3600,
        },
    )
    status, body, response = api("GET", "/status")
    assert status == 200 and list(body) == ["daemon", "internal_queue", "rs_capacity", "queues"]
    assert body["daemon"]["daemon_id"] == "test-daemon" and body["internal_queue"]["max_size"] == 1000
    assert list(body["queues"]) == ["1", "10"]
    assert body["queues"]["1"]["autorecache"] == {"total": 3, "due_now": 2}
    assert body["queues"]["1"]["high"] == {"total": 0, "due_now": 0}
    assert isinstance(body["daemon"]["uptime_seconds"], int)
    assert body["daemon"]["last_tick"].endswith("Z") and len(body["daemon"]["last_tick"]) == 20


@pytest.mark.parametrize(
    "services, expected",
    [
        ([("rs-1", 100, 0)], (100, 30, 70)),
        ([("rs-1", 100, 40)], (60, 18, 42)),
        ([("a", 100, 20), ("b", 50, 10), ("c", 30, 30)], (120, 36, 84)),
        ([("rs-1", 50, 50)], (0, 0, 0)),
        ([], (0, 0, 0)),
    ],
)
def test_41_42_capacity(api: Api, redis, services, expected) -> None:
    for name, capacity, load in services:
        rs(redis, name, capacity, load)
    status, body, response = api("GET", "/status")
    total, reserved, available = expected
    capacity = body["rs_capacity"]
    # EdgeComet's four fields, first and exact; then cachesvc's: the line, the budget it leaves, claims in flight.
    assert list(capacity)[:4] == [
        "total_free_tabs",
        "reserved_for_online",
        "available_for_recache",
        "reservation_percent",
    ]
    assert {k: capacity[k] for k in list(capacity)[:4]} == {
        "total_free_tabs": total,
        "reserved_for_online": reserved,
        "available_for_recache": available,
        "reservation_percent": 30,
    }
    assert b'"reservation_percent":30,' in response.raw_body
    line = int(0.7 * sum(c for _, c, _ in services) + 1e-9)
    load = sum(used for _, _, used in services)
    assert capacity["capacity_line"] == line and capacity["in_flight"] == 0
    assert capacity["recache_budget"] == max(0, line - load)


def test_43_stale_render_service_is_ignored(api: Api, redis) -> None:
    rs(redis, "old", 100, 0, age=5)
    rs(redis, "new", 10, 0)
    assert api("GET", "/status")[1]["rs_capacity"]["total_free_tabs"] == 10


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that run a gateway.

    The module's daemon schedules from the suite's Redis.
    """
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


def tick_after(api: Api, moment: str) -> str | None:
    """``/status`` last_tick (whole seconds, RFC 3339) if it is later than *moment*."""
    tick = api("GET", "/status")[1]["daemon"]["last_tick"]
    return tick if tick > moment else None


def test_46_pause_holds_due_entries_until_resume(tmp_path: Path, own_redis: RedisServer) -> None:
    daemon, port = start_with(tmp_path, own_redis)  # ticks every 100 ms
    eg = FakeEG(tmp_path, own_redis.addr)  # registered, with render capacity: nothing but the pause holds entries back
    client = redis_py.Redis(port=own_redis.port)
    try:
        daemon.wait_for_port(port)
        api = Api(port)
        status, body, response = api("POST", "/internal/scheduler/pause")
        assert response.raw_body == b'{"success":true,"message":"Scheduler paused"}'
        time.sleep(0.5)  # the pause is read when a tick starts: let a cycle begun just before it finish
        urls = [f"https://example.com/paused{i}" for i in range(3)]
        assert recache(api, urls=urls, dimension_ids=[1])[0] == 200  # due now
        # Ticks go on while paused (last_tick moves twice, a second apart: at least ten 100 ms ticks),
        # yet nothing is claimed or sent.
        paused_at = api("GET", "/status")[1]["daemon"]["last_tick"]
        one = wait_until(lambda: tick_after(api, paused_at), 10, "a tick while paused")
        wait_until(lambda: tick_after(api, one), 10, "more ticks while paused")
        assert eg.events() == [] and eg.stats()["requests"] == 0
        assert client.zcard("recache:1:high") == 3 and client.zcard("cachesvc:inflight") == 0
        assert api("GET", "/status")[1]["queues"]["1"]["high"] == {"total": 3, "due_now": 3}
        assert api("GET", "/internal/cache/queue/summary?host_id=1")[1]["data"] == {"pending": 3, "processing": 0}
        status, body, response = api("POST", "/internal/scheduler/resume")
        assert response.raw_body == b'{"success":true,"message":"Scheduler resumed"}'
        wait_until(lambda: len(eg.events("end")) == 3, 15, "the held entries sent after resume")
        assert sorted(e["json"]["url"] for e in eg.events()) == urls
        wait_until(
            lambda: client.zcard("recache:1:high") == 0 and client.zcard("cachesvc:inflight") == 0, 10, "queue drained"
        )
        assert api("GET", "/internal/cache/queue/summary?host_id=1")[1]["data"] == {"pending": 0, "processing": 0}
    finally:
        client.close()
        daemon.stop()
        eg.stop()


# --- listings -----------------------------------------------------------------------------------


def cached(redis, n: int, **overrides: Any) -> list[str]:
    t = now()
    keys = []
    for i in range(n):
        url = overrides.pop("url", None) or f"https://test.example.com/products/{i}"
        key = f"meta:cache:1:1:hash{i:04d}{overrides.get('tag', '')}"
        fields = {
            "url": url,
            "dimension": "desktop",
            "created_at": t,
            "expires_at": t + 3600,
            "size": 1024,
            "status_code": 200,
            "source": "render",
            "key": key[5:],
            "disk_size": 512,
            "last_access": t,
        }
        fields.update({k: v for k, v in overrides.items() if k != "tag"})
        redis.hset(key, mapping=fields)
        keys.append(key)
    return keys


def test_62_cache_urls(api: Api, redis) -> None:
    cached(redis, 5)
    status, body, _ = api("GET", "/internal/cache/urls?host_id=1")
    data = body["data"]
    assert status == 200 and len(data["items"]) == 5 and data["cursor"] == "0" and data["has_more"] is False
    item = data["items"][0]
    assert list(item) == [
        "url",
        "title",
        "dimension",
        "status",
        "cache_age",
        "size",
        "disk_size",
        "last_access",
        "cache_key",
        "created_at",
        "expires_at",
        "status_code",
        "source",
        "index_status",
    ]
    assert item["status"] == "active" and "last_bot_hit" not in item


def test_63_to_69_filters(api: Api, redis) -> None:
    t = now()
    cached(redis, 2)
    cached(redis, 1, tag="s", expires_at=t - 10)
    cached(redis, 1, tag="e", expires_at=t - 3600, dimension="mobile", size=5000, last_bot_hit=t)
    def get(q: str) -> tuple[Any, ...]:
        return api("GET", "/internal/cache/urls?host_id=1&" + q)[:2]

    assert [i["status"] for i in get("status=active")[1]["data"]["items"]] == ["active", "active"]
    assert sorted(i["status"] for i in get("status=stale,+expired")[1]["data"]["items"]) == ["expired", "stale"]
    assert [i["dimension"] for i in get("dimension=mobile")[1]["data"]["items"]] == ["mobile"]
    assert get("dimension=mobile,+desktop")[0] == 200
    assert get("dimension=tablet") == (400, {"success": False, "message": "dimension 'tablet' not configured for host"})
    assert len(get("url_contains=PRODUCTS")[1]["data"]["items"]) == 4
    assert get("url_contains=" + "x" * 201)[0] == 400
    assert get("limit=0")[1]["message"] == "limit must be between 1 and 100"
    assert get("limit=101")[1]["message"] == "limit must be between 1 and 100"
    assert get("limit=abc")[1]["message"] == "limit must be a valid integer"
    assert get("size_min=1000&size_max=500") == (400, {"success": False, "message": "size_max must be >= size_min"})
    assert get("cache_age_min=1000&cache_age_max=500")[1]["message"] == "cache_age_max must be >= cache_age_min"
    assert get("size_min=-1")[1]["message"] == "size_min must be >= 0"
    assert [i["size"] for i in get("size_min=2000")[1]["data"]["items"]] == [5000]
    assert get("status=invalid")[1]["message"] == "invalid status filter: invalid"
    assert get("source=cached")[1]["message"] == "source must be 'render' or 'bypass'"
    assert get("status_code=abc")[1]["message"] == "invalid status_code filter: abc (must be numeric)"
    assert len(get("status_code=200,+404")[1]["data"]["items"]) == 4
    assert get("index_status=5")[1]["message"] == "invalid index_status filter: 5"
    expired = [i for i in get("")[1]["data"]["items"] if i["status"] == "expired"]
    assert expired[0]["last_bot_hit"] == t and list(expired[0])[-1] == "last_bot_hit"
    assert api("GET", "/internal/cache/urls")[:2] == (400, {"success": False, "message": "host_id is required"})
    assert api("GET", "/internal/cache/urls?host_id=abc")[1]["message"] == "host_id must be a valid integer"
    assert api("GET", "/internal/cache/urls?host_id=999")[:2] == (
        404,
        {"success": False, "message": "host_id 999 not found"},
    )


@pytest.mark.parametrize("limit", [1, 3, 7, 25, 100])
def test_cache_urls_paging_returns_every_entry_once(api: Api, redis, limit: int) -> None:
    keys = cached(redis, 57)
    for i in range(40):  # other hosts' keys share the SCAN batches and must not shift the cursor
        redis.hset(f"meta:cache:2:1:other{i}", "url", "x")
    seen, cursor, pages = [], "0", 0
    while True:
        status, body, _ = api("GET", f"/internal/cache/urls?host_id=1&limit={limit}&cursor={cursor}")
        assert status == 200 and len(body["data"]["items"]) <= limit
        seen += [item["cache_key"] for item in body["data"]["items"]]
        cursor = body["data"]["cursor"]
        pages += 1
        assert body["data"]["has_more"] == (cursor != "0")
        if cursor == "0":
            break
        assert pages < 200
    assert sorted(seen) == sorted(k[5:] for k in keys)


def test_70_summary(api: Api, redis) -> None:
    t = now()
    cached(redis, 3, size=1000)
    cached(redis, 2, tag="s", size=2000, expires_at=t - 10, source="bypass", dimension="mobile")
    cached(redis, 1, tag="e", size=500, expires_at=t - 3600)
    status, body, response = api("GET", "/internal/cache/summary?host_id=1")
    assert body["data"] == {
        "total_urls": 6,
        "active_count": 3,
        "stale_count": 2,
        "expired_count": 1,
        "total_size": 7500,
        "by_dimension": {"desktop": 4, "mobile": 2},
        "by_source": {"bypass": 2, "render": 4},
    }
    redis.flushall()
    assert api("GET", "/internal/cache/summary?host_id=1")[1]["data"] == {
        "total_urls": 0,
        "active_count": 0,
        "stale_count": 0,
        "expired_count": 0,
        "total_size": 0,
        "by_dimension": {},
        "by_source": {},
    }


def test_71_72_73_queue_listing(api: Api, redis) -> None:
    redis.zadd("recache:1:high", {encode_member("https://a.com/h", 1): 100})
    redis.zadd(
        "recache:1:normal",
        {encode_member("https://a.com/n", 2): 200, encode_member("https://a.com/u", 99): 300, b"not-json": 1},
    )
    items = api("GET", "/internal/cache/queue?host_id=1")[1]["data"]["items"]
    assert items[0] == {"url": "https://a.com/h", "dimension": "desktop", "priority": "high", "scheduled_at": 100}
    assert items[1]["priority"] == "normal" and items[1]["dimension"] == "mobile" and items[2]["dimension"] == "unknown"
    assert len(items) == 3
    redis.flushall()
    redis.zadd("recache:1:high", {encode_member(f"https://a.com/{i}", 1): i for i in range(8)})
    redis.zadd("recache:1:normal", {encode_member("https://a.com/n", 1): 1})
    def page(q: str) -> Any:
        return api("GET", "/internal/cache/queue?host_id=1&priority=high&limit=3" + q)[1]["data"]

    first, second, third = page(""), page("&cursor=3"), page("&cursor=6")
    assert (first["cursor"], first["has_more"], len(first["items"])) == ("3", True, 3)
    assert (second["cursor"], len(second["items"])) == ("6", 3)
    assert (third["cursor"], third["has_more"], len(third["items"])) == ("0", False, 2)
    assert {i["priority"] for i in first["items"] + second["items"] + third["items"]} == {"high"}
    assert (
        api("GET", "/internal/cache/queue?host_id=1&priority=urgent")[1]["message"] == "invalid priority filter: urgent"
    )
    redis.zadd("recache:1:autorecache", {encode_member("https://a.com/ar", 1): 5})
    assert api("GET", "/internal/cache/queue/summary?host_id=1")[1]["data"] == {"pending": 10, "processing": 0}


# --- limits and faults --------------------------------------------------------------------------


def raw_request(port: int, head: bytes, chunks: list[bytes]) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # the daemon may hang up as soon as it has seen enough
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
        return data


def test_oversized_body_is_refused_before_it_is_read(api: Api, redis) -> None:
    auth = f"X-Internal-Auth: {KEY}\r\n".encode()
    # Content-Length over the limit: refused from the headers alone, no body sent at all.
    head = b"POST /internal/cache/recache HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 2100000\r\n\r\n"
    reply = raw_request(api.port, head, [])
    assert reply.startswith(b"HTTP/1.1 413") and b"too large" in reply
    # Chunked: refused once the chunks seen so far pass the limit.
    head = b"POST /internal/cache/recache HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (100_000, b"a" * 100_000)
    reply = raw_request(api.port, head, [chunk] * 21)
    assert reply.startswith(b"HTTP/1.1 413")
    assert redis.keys("*") == []
    assert api("GET", "/status")[0] == 200  # still serving
    # A body just under the limit is read and judged normally.
    status, body, _ = api("POST", "/internal/cache/recache", b'{"host_id":1,"urls":["' + b"a" * 1_000_000 + b'"]}')
    assert status == 400 and body["message"] == "priority must be 'high' or 'normal'"


def test_redis_down_gives_503_quickly_then_recovers(tmp_path: Path) -> None:
    from harness.redis_server import RedisServer

    server = RedisServer()
    server.start()
    port = free_port()
    conf = write_configs(tmp_path, server.addr, port)
    proc = Daemon(["--config", str(conf)], tmp_path)
    try:
        proc.wait_for_port(port)
        api = Api(port)
        assert api("GET", "/status")[0] == 200
        server.stop()
        requests = [
            ("GET", "/status", None), ("GET", "/healthz", None),
            ("POST", "/internal/cache/recache", {"host_id": 1, "urls": ["https://a.com/x"], "priority": "high"}),
            ("POST", "/internal/cache/invalidate", {"host_id": 1, "urls": ["https://a.com/x"]}),
            ("POST", "/internal/cache/invalidate-all", {"host_id": 1}),
            ("GET", "/internal/cache/urls?host_id=1", None), ("GET", "/internal/cache/summary?host_id=1", None),
            ("GET", "/internal/cache/queue?host_id=1", None), ("GET", "/internal/cache/queue/summary?host_id=1", None),
        ]
        for method, path, body in requests:
            started = time.monotonic()
            status, data, _ = api(method, path, body)
            assert status == 503, (path, status, data)
            assert "redis" in data["message"].lower()
            assert time.monotonic() - started < 6, path  # within request_timeout (2s) plus slack
        server.start()
        deadline = time.monotonic() + 20
        while api("GET", "/status")[0] != 200:
            assert time.monotonic() < deadline, "did not recover after Redis came back"
            time.sleep(0.2)
        assert api("GET", "/healthz", auth=None)[0] == 200
    finally:
        proc.stop()
        server.close()


# --- configuration ------------------------------------------------------------------------------


def start_with(
    tmp_path: Path, redis_server, extra: str = "", extra_api: str = "", replace: tuple[str, str] | None = None
) -> tuple[Daemon, int]:
    port = free_port()
    conf = write_configs(tmp_path, redis_server.addr, port, extra_api=extra_api, extra=extra)
    text = conf.read_text().replace("PORT", str(port))
    if replace:
        text = text.replace(*replace)
    conf.write_text(text)
    return Daemon(["--config", str(conf)], tmp_path), port


@pytest.mark.parametrize(
    "replace, extra, message",
    [
        (("tick_interval: 100ms", "tick_interval: 50ms"), "", "scheduler.tick_interval must be >= 100ms"),
        (
            ("tick_interval: 100ms, normal_check_interval: 6s", "tick_interval: 1s, normal_check_interval: 1500ms"),
            "",
            "must be a multiple of tick_interval",
        ),
        (None, "foo: 1\n", "unknown configuration field"),
        (None, 'metrics: {enabled: true, listen: "127.0.0.1:PORT"}\n', "must differ"),
        (
            ("rs_capacity_reserved: 0.30", "rs_capacity_reserved: 1.5"),
            "",
            "rs_capacity_reserved must be between 0.0 and 1.0",
        ),
        (("max_retries: 3", "max_retries: 0"), "", "max_retries must be >= 1"),
        (("max_size: 1000", "max_size: 0"), "", "max_size must be > 0"),
        (("timeout_per_url: 60s", "timeout_per_url: 0s"), "", "timeout_per_url must be > 0"),
        (("daemon_id: test-daemon", "daemon_id: ''"), "", "daemon_id must be specified"),
    ],
)
def test_74_to_78_bad_config_refuses_to_start(tmp_path: Path, redis_server, replace, extra, message) -> None:
    daemon, port = start_with(tmp_path, redis_server, extra=extra, replace=replace)
    code = daemon.exit_code()
    daemon.stop()
    assert code != 0 and message in daemon.log, daemon.log


def test_bad_eg_config_names_the_file(tmp_path: Path, redis_server) -> None:
    daemon, port = start_with(tmp_path, redis_server)
    daemon.proc.kill()
    daemon.stop()
    (tmp_path / "hosts.d" / "02-dup.yaml").write_text("hosts:\n  - id: 1\n    domain: dup.example.com\n")
    conf = tmp_path / "cache-daemon.yaml"
    again = Daemon(["--config", str(conf)], tmp_path)
    assert again.exit_code() != 0
    again.stop()
    assert "02-dup.yaml" in again.log and "01-test.yaml" in again.log and "unique" in again.log


def test_79_api_disabled(tmp_path: Path, redis_server) -> None:
    daemon, port = start_with(tmp_path, redis_server, replace=("  enabled: true\n", "  enabled: false\n"))
    try:
        daemon.wait_for_log("HTTP API is disabled in configuration")
        with pytest.raises(ConnectionRefusedError):
            Api(port)("GET", "/status")
    finally:
        daemon.stop()


def test_47_scheduler_control_disabled(tmp_path: Path, redis_server) -> None:
    daemon, port = start_with(
        tmp_path, redis_server, replace=("scheduler_control_api: true", "scheduler_control_api: false")
    )
    try:
        daemon.wait_for_port(port)
        for path in ("/internal/scheduler/pause", "/internal/scheduler/resume"):
            assert Api(port)("POST", path)[:2] == (
                403,
                {"success": False, "message": "Scheduler control API not enabled"},
            )
    finally:
        daemon.stop()


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


class Scrape:
    """One scrape of ``/metrics``, by sample.

    ``Scrape(port, "shop")("api_requests_total", code="200")`` is that value, or None.
    """

    def __init__(self, port: int, namespace: str) -> None:
        status, text = scrape(port)
        assert status == 200, text
        self.prefix = f"{namespace}_cd_"
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for family in text_string_to_metric_families(text) for s in family.samples}

    def __call__(self, name: str, **labels: str) -> float | None:
        return self.samples.get((self.prefix + name, frozenset(labels.items())))


def test_metrics_record_what_the_traffic_did(tmp_path: Path, own_redis: RedisServer) -> None:
    mport = free_port()
    daemon, port = start_with(
        tmp_path, own_redis, extra=f"metrics: {{enabled: true, listen: '127.0.0.1:{mport}', namespace: shop}}\n"
    )
    eg = FakeEG(tmp_path, own_redis.addr)
    client = redis_py.Redis(port=own_redis.port)
    try:
        daemon.wait_for_port(port)
        daemon.wait_for_port(mport)
        api = Api(port)
        for _ in range(3):
            assert api("GET", "/status")[0] == 200
        for _ in range(2):
            assert api("GET", "/status", auth="bad")[0] == 401
        assert api("GET", "/nope")[0] == 404
        urls = [f"https://example.com/m{i}" for i in range(4)]
        assert recache(api, urls=urls, dimension_ids=[1])[0] == 200
        client.zadd("recache:1:high", {b"not-valid-json": now()})  # quarantined: one dead letter
        client.zadd("recache:1:normal", {encode_member("https://example.com/later", 1): now() + 3600})  # waits an hour
        wait_until(
            lambda: len(eg.events("end")) == 4 and client.hlen("cachesvc:deadletter:1") == 1,
            15,
            "entries sent and quarantined",
        )
        # The queue gauges are set each tick: wait for one after the drain.
        wait_until(lambda: (got := Scrape(mport, "shop"))("queue_depth", queue_type="high") == 0
                   and got("queue_depth", queue_type="normal") == 1, 10, "queue depth after the drain")
        metric = Scrape(mport, "shop")
        assert metric("api_requests_total", endpoint="/status", code="200") == 3
        assert metric("api_requests_total", endpoint="/status", code="401") == 2
        assert metric("api_requests_total", endpoint="other", code="404") == 1
        assert metric("api_requests_total", endpoint="/internal/cache/recache", code="200") == 1
        assert metric("recache_requests_total", status="success", queue_type="high") == 4
        assert metric("eg_requests_total", eg_id="test-eg-1", status="success") == 4
        assert metric("recache_duration_seconds_count") == 4 and metric("recache_duration_seconds_sum") > 0
        assert metric("dead_letters_total", reason="undecodable") == 1
        assert metric("queue_depth", queue_type="autorecache") == 0
        assert metric("in_flight") == 0
        redis_ok = {dict(labels)["operation"]: v for (name, labels), v in metric.samples.items()
                    if name == "shop_cd_redis_operations_total" and dict(labels)["status"] == "ok"}
        assert redis_ok.get("eval", 0) > 0 and sum(redis_ok.values()) >= 10, redis_ok
        assert scrape(mport, "/metrics/") == (404, "Not Found")
    finally:
        client.close()
        daemon.stop()
        eg.stop()
