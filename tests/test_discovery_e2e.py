"""Registry discovery end to end: a ``twistd`` daemon beside 100,000 unrelated ``meta:cache:*`` keys.

An idle daemon must not SCAN the keyspace on every tick, nor ``/status`` on every call (SCAN
commands counted in ``INFO commandstats``); a gateway and a Render Service that register after the
daemon started are used within 10 s, with keyspace notifications (the suite's Redis, where CONFIG
is allowed) and without them (a Redis of the test's own whose CONFIG is refused by ACL, as on a
managed Redis); a Render Service that leaves is noticed; a Redis restart is followed by a new
subscription and a full discovery.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachesvc.recache.members import encode_member
from harness.daemon import Daemon, free_port, wait_until
from harness.fake_eg import FakeEG
from harness.redis_server import RedisServer
from tests.test_api_e2e import Api, write_configs
from tests.test_discovery import fill, refuse_config, scans

KEYS = 100_000


class Stack:
    def __init__(self, base: Path, addr: str) -> None:
        self.base, self.addr = base, addr
        self.daemon: Daemon | None = None
        self.egs: list[FakeEG] = []

    def start(self) -> Api:
        port = free_port()
        conf = write_configs(self.base, self.addr, port)
        self.daemon = Daemon(["--config", str(conf)], self.base)
        self.daemon.wait_for_port(port)
        return Api(port)

    def eg(self, eg_id: str = "test-eg-1") -> FakeEG:
        self.egs.append(FakeEG(self.base, self.addr, eg_id=eg_id))
        return self.egs[-1]

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        for eg in self.egs:
            eg.stop()


def discovery(api: Api) -> dict[str, Any]:
    status, body, _ = api("GET", "/status")
    assert status == 200, body
    return body["daemon"]["discovery"]  # type: ignore[no-any-return]


@pytest.fixture(params=["notifications", "scan"])
def keyspace(request: pytest.FixtureRequest, redis_server: Any, redis: Any) -> Iterator[tuple[str, str, Any]]:
    """(mode, Redis address, client): the suite's Redis, or one of our own whose CONFIG is refused."""
    import redis as redis_py

    if request.param == "notifications":
        fill(redis, KEYS)
        yield request.param, redis_server.addr, redis
        return
    server = RedisServer()
    server.start()
    client = redis_py.Redis(host="127.0.0.1", port=server.port)
    try:
        fill(client, KEYS)
        refuse_config(client)
        yield request.param, server.addr, client
    finally:
        client.close()
        server.close()


@pytest.fixture
def stack(tmp_path: Path, keyspace: tuple[str, str, Any]) -> Iterator[Stack]:
    s = Stack(tmp_path, keyspace[1])
    try:
        yield s
    finally:
        s.close()


def test_an_idle_daemon_does_not_scan_the_keyspace_and_status_is_fast(stack: Stack, keyspace: Any) -> None:
    mode, _, client = keyspace
    api = stack.start()
    wait_until(lambda: discovery(api)["synced"] and discovery(api)["mode"] == mode, 10, f"{mode} mode")
    assert stack.daemon is not None
    stack.daemon.wait_for_log("registry discovery by " + ("keyspace notifications" if mode == "notifications"
                                                          else "incremental SCAN"))
    time.sleep(1)
    before, started = scans(client), time.monotonic()
    time.sleep(3)  # 30 ticks of 100 ms
    per_second = (scans(client) - before) / (time.monotonic() - started)
    # A SCAN of the keyspace per tick is 100+ calls per tick. With notifications: a 10-minute sweep,
    # about one call a second; without: a pass every 8 s in steps of 5,000 keys, 2.5 calls a second.
    assert per_second <= (2 if mode == "notifications" else 4), f"{per_second:.1f} SCAN calls a second"
    before, took = scans(client), []
    for _ in range(20):
        t = time.monotonic()
        discovery(api)
        took.append(time.monotonic() - t)
    assert scans(client) - before <= 2, "/status scanned the keyspace"
    assert statistics.median(took) < 0.05 and max(took) < 0.25, [f"{t * 1000:.0f} ms" for t in took]


def test_a_gateway_and_render_service_registering_later_are_used_within_10s(stack: Stack, keyspace: Any) -> None:
    mode, _, client = keyspace
    api = stack.start()
    wait_until(lambda: discovery(api)["synced"] and discovery(api)["mode"] == mode, 10, f"{mode} mode")
    client.zadd("recache:1:high", {encode_member("https://example.com/late", 1): int(time.time())})
    time.sleep(0.5)
    started = time.monotonic()
    eg = stack.eg()  # registers registry:eg:test-eg-1 and service:render:rs-1 (capacity 100)
    wait_until(lambda: eg.events("end"), 10, "sent to the gateway that registered")
    took = time.monotonic() - started
    assert took < (2 if mode == "notifications" else 10), f"{took:.1f} s"
    described = discovery(api)
    assert (described["gateway_keys"], described["render_service_keys"]) == (1, 1)


def test_a_render_service_that_leaves_is_noticed(stack: Stack, keyspace: Any) -> None:
    mode, _, client = keyspace
    api = stack.start()
    wait_until(lambda: discovery(api)["synced"], 10, "first full pass")
    seen = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set("service:render:rs-9", f'{{"id":"rs-9","capacity":50,"load":0,"last_seen":"{seen}"}}', ex=60)
    wait_until(lambda: discovery(api)["render_service_keys"] == 1, 10, "the RS found")
    client.delete("service:render:rs-9")
    started = time.monotonic()
    wait_until(lambda: discovery(api)["render_service_keys"] == 0, 5, "the RS noticed gone")
    assert time.monotonic() - started < 1.5
    assert api("GET", "/status")[1]["rs_capacity"]["total_free_tabs"] == 0


def test_a_redis_restart_is_followed_by_a_new_subscription_and_a_full_discovery(tmp_path: Path) -> None:
    import redis as redis_py

    server = RedisServer()
    server.start()
    client = redis_py.Redis(host="127.0.0.1", port=server.port)
    s = Stack(tmp_path, server.addr)
    try:
        api = s.start()
        wait_until(lambda: discovery(api)["mode"] == "notifications", 10, "notifications mode")
        passes = discovery(api)["full_passes"]
        server.stop()
        assert s.daemon is not None
        s.daemon.wait_for_log("the pub/sub connection was lost", 10)
        server.start()  # empty; its notify-keyspace-events is back to ""
        client.set("registry:eg:eg-away", '{"eg_id":"eg-away","address":":1","sharding_enabled":true}', ex=60)
        wait_until(lambda: discovery(api)["subscriptions"] == 2, 15, "subscribed again")
        described = discovery(api)
        assert described["mode"] == "notifications" and described["full_passes"] > passes
        assert described["gateway_keys"] == 1  # written while nobody listened: found by the full pass
        assert set(client.config_get("notify-keyspace-events")["notify-keyspace-events"]) >= set("K$gx")
        client.set("registry:eg:eg-next", "{}", ex=60)
        wait_until(lambda: discovery(api)["gateway_keys"] == 2, 2, "notified again")
    finally:
        s.close()
        client.close()
        server.close()
