"""What the recache half logs: a debug line per successful recache, a per-minute info summary, no noise.

In-process (the scheduler on a ``Clock``): the summary counts sent, succeeded, failed and
dead-lettered requests, once a minute, and says nothing for a quiet minute. End to end (twistd, a
real Redis, a fake Edge Gateway): at ``info`` a recache writes no connection-pool lines and no
access-log line for the API; at ``debug`` both the success and the API request show.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from cachesvc import config
from cachesvc.recache.members import encode_member
from cachesvc.recache.scheduler import SUMMARY_EVERY
from harness.daemon import Daemon, free_port, wait_until
from harness.fake_eg import FakeEG
from tests.test_api_e2e import Api, write_configs
from tests.test_scheduler_clock import Harness, claim


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    (tmp_path / "hosts.d").mkdir()
    (tmp_path / "hosts.d" / "a.yaml").write_text(
        "hosts:\n  - id: 1\n    domain: a.example\n    dimensions: {desktop: {id: 1}}\n")
    (tmp_path / "edge-gateway.yaml").write_text("internal: {auth_key: k}\nhosts: {include: hosts.d}\n")
    conf = tmp_path / "cd.yaml"
    conf.write_text("eg_config: edge-gateway.yaml\ndaemon_id: cd-test\nredis: {addr: '127.0.0.1:1'}\n"
                    "internal_queue: {max_size: 100, max_retries: 1, retry_base_delay: 5s}\n")
    settings = config.resolve(str(conf)).recache
    assert settings is not None
    harness = Harness(settings)
    harness.ledger.synchronous = True
    yield harness
    if harness.scheduler.running:
        harness.scheduler.stopService()
        harness.clock.advance(60)


def messages(events: list[dict[str, Any]], level: LogLevel) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_level") == level]


def test_successes_at_debug_and_a_summary_a_minute(h: Harness, events: list[dict[str, Any]]) -> None:
    h.dispatcher.answers = {"https://a.example/bad": 404, "https://a.example/down": 503}
    h.ledger.retry_answer = "dead"  # max_retries 1: the failure is dead-lettered at once
    h.ledger.batches = [[claim("https://a.example/ok"), claim("https://a.example/ok2"), claim("https://a.example/bad"),
                         claim("https://a.example/down")]]
    h.start()
    h.tick()
    debug = messages(events, LogLevel.debug)
    assert [m for m in debug if m.startswith("Recache succeeded")] == [
        m for m in debug if "url='https://a.example/ok" in m]
    assert len([m for m in debug if m.startswith("Recache succeeded")]) == 2
    assert not [m for m in messages(events, LogLevel.info) if "Recache succeeded" in m]
    h.clock.advance(SUMMARY_EVERY - 1)
    summaries = [m for m in messages(events, LogLevel.info) if m.startswith("recache requests in the last")]
    assert summaries == ["recache requests in the last 60s: sent=4 succeeded=2 failed=2 dead_lettered=2"]
    h.clock.advance(SUMMARY_EVERY)  # a quiet minute: no line
    assert len([m for m in messages(events, LogLevel.info) if m.startswith("recache requests")]) == 1


def test_the_summary_stops_with_the_scheduler(h: Harness, events: list[dict[str, Any]]) -> None:
    h.start()
    h.scheduler.stopService()
    assert not h.scheduler._summary.running


@pytest.mark.parametrize("level", ["info", "debug"])
def test_no_pool_lines_and_the_api_access_line_at_debug(tmp_path: Path, redis_server: Any, redis: Any,
                                                         level: str) -> None:
    eg = FakeEG(tmp_path, redis_server.addr)
    port = free_port()
    conf = write_configs(tmp_path, redis_server.addr, port, extra=f"logging: {{level: {level}}}\n")
    daemon = Daemon(["--config", str(conf)], tmp_path)
    try:
        daemon.wait_for_port(port)
        for i in range(3):
            redis.zadd("recache:1:high", {encode_member(f"https://example.com/p{i}", 1): int(time.time())})
            wait_until(lambda n=i: len(eg.events("end")) == n + 1, 10, "recache sent")  # a new connection each
            time.sleep(0.2)
        assert Api(port)("GET", "/status")[0] == 200
        if level == "debug":
            daemon.wait_for_log("GET /status 200")
            daemon.wait_for_log("Recache succeeded url='https://example.com/p2'")
        else:
            time.sleep(0.5)
    finally:
        daemon.stop()
        eg.stop()
    log = daemon.log
    assert "HTTP11ClientFactory" not in log and "Starting factory" not in log
    assert ("GET /status" in log) is (level == "debug") and ("Recache succeeded" in log) is (level == "debug")
