"""Edge Gateway faults end to end (issue 9): a body that stalls, a body of 100 MB.

A ``twistd`` daemon, the suite's real Redis, and ``harness.slow_gateway`` (a real twisted.web
gateway in its own process that counts the connections open to it). The daemon's file descriptors
come from ``/proc/<pid>/fd``, its memory from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachesvc.recache.members import encode_member
from harness.daemon import Daemon, free_port, wait_until
from harness.slow_gateway import SlowGateway
from tests.test_api_e2e import Api, write_configs

HIGH = "recache:1:high"


def fds(daemon: Daemon) -> int:
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def memory_kib(daemon: Daemon, field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (the peak resident size) of the daemon, in KiB."""
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{daemon.proc.pid}/status")


class Run:
    """One daemon against one slow gateway."""

    def __init__(self, base: Path, redis_server) -> None:
        self.base = base
        self.redis_server = redis_server
        self.gateway: SlowGateway | None = None
        self.daemon: Daemon | None = None

    def start(self, mode: str, timeout: str, retry_base_delay: str, max_retries: int) -> tuple[SlowGateway, Daemon]:
        self.gateway = SlowGateway(self.redis_server.addr, mode)
        port = free_port()
        conf = write_configs(self.base, self.redis_server.addr, port)
        text = conf.read_text()
        text = text.replace("timeout_per_url: 60s}", f"timeout_per_url: {timeout}, gateway_cooldown: 100ms}}")
        text = text.replace("max_retries: 3, retry_base_delay: 100ms",
                            f"max_retries: {max_retries}, retry_base_delay: {retry_base_delay}")
        conf.write_text(text)
        self.daemon = Daemon(["--config", str(conf)], self.base)
        self.daemon.wait_for_port(port)
        api = Api(port)
        wait_until(lambda: api("GET", "/healthz", auth=None)[0] == 200, 10, "daemon connected to Redis")
        return self.gateway, self.daemon

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.gateway is not None:
            self.gateway.stop()


@pytest.fixture
def run(tmp_path: Path, redis_server, redis) -> Iterator[Run]:
    r = Run(tmp_path, redis_server)
    try:
        yield r
    finally:
        r.close()


def members(count: int, name: str) -> dict[bytes, int]:
    return {encode_member(f"https://test.example.com/{name}/{i}", 1): int(time.time()) for i in range(count)}


def test_a_body_that_stalls_is_cut_off_at_timeout_per_url_and_takes_the_retry_path(run: Run, redis) -> None:
    gateway, daemon = run.start("stall", timeout="2s", retry_base_delay="4s", max_retries=2)
    time.sleep(1)  # the first ticks: registry read, pools settled
    baseline = fds(daemon)
    entries = members(8, "stall")
    redis.zadd(HIGH, entries)
    wait_until(lambda: gateway.stats()["requests"] == 8, 10, "8 requests at the gateway")
    sent = time.monotonic()
    assert gateway.stats()["open_connections"] == 8  # headers and 1 KiB sent; the body stalls
    stalled = fds(daemon)
    # timeout_per_url (2 s) later, the daemon has closed every connection and taken the retry path:
    # the entries wait in their queue (4 s backoff) with one attempt counted.
    wait_until(lambda: gateway.stats()["open_connections"] == 0, 5, "the daemon closed its stalled connections")
    assert time.monotonic() - sent >= 1.5
    wait_until(lambda: redis.zcard(HIGH) == 8 and redis.hlen("cachesvc:attempts") == 8, 5, "entries back for a retry")
    assert redis.zcard("cachesvc:inflight") == 0
    assert fds(daemon) <= baseline + 1, (fds(daemon), baseline)
    assert gateway.stats()["requests"] == 8  # nothing resent before the backoff
    # The second attempt stalls too and exhausts max_retries: dead-lettered with the reason.
    wait_until(lambda: redis.hlen("cachesvc:deadletter:1") == 8, 15, "exhausted entries dead-lettered")
    assert gateway.stats()["requests"] == 16
    wait_until(lambda: gateway.stats()["open_connections"] == 0, 5, "second attempts' connections closed")
    record = json.loads(next(iter(redis.hvals("cachesvc:deadletter:1"))))
    assert record["attempts"] == 2 and "TimeoutError" in record["reason"], record
    assert "timeout_per_url" in record["reason"], record
    assert redis.zcard(HIGH) == 0 and redis.zcard("cachesvc:inflight") == 0
    assert fds(daemon) <= baseline + 1, (fds(daemon), baseline)
    print(f"daemon fds: {baseline} before, {stalled} with 8 stalled bodies, {fds(daemon)} after the timeouts")


def test_three_answers_of_100_mb_are_acked_without_being_read_into_memory(run: Run, redis) -> None:
    gateway, daemon = run.start("huge", timeout="30s", retry_base_delay="100ms", max_retries=3)
    time.sleep(1)
    rss_before = memory_kib(daemon, "VmRSS")
    for i in range(3):  # one after the other: three 100 MB answers
        redis.zadd(HIGH, members(1, f"huge{i}"))
        wait_until(lambda: redis.zcard(HIGH) == 0 and redis.zcard("cachesvc:inflight") == 0, 20, f"answer {i} settled")
    assert gateway.stats()["requests"] == 3  # each a 200: acked the first time
    assert redis.hlen("cachesvc:deadletter:1") == 0 and redis.hlen("cachesvc:attempts") == 0
    peak, rss_after = memory_kib(daemon, "VmHWM"), memory_kib(daemon, "VmRSS")
    assert peak - rss_before < 50 * 1024, (rss_before, peak, rss_after)
    assert rss_after - rss_before < 20 * 1024, (rss_before, peak, rss_after)
    # The daemon read the status and a little of each body, then closed the connection.
    wait_until(lambda: gateway.stats()["open_connections"] == 0, 5, "connections closed")
    assert gateway.stats()["completed"] == 0
    print(f"RSS {rss_before} KiB -> peak {peak} KiB, {rss_after} KiB after; "
          f"body bytes the gateway got out: {gateway.stats()['body_bytes_sent']}")
