"""The registry watcher (cachesvc.recache.discovery): bounded discovery in a big shared keyspace.

Two speeds (STYLE.md 8). In-process on a ``Clock``: an in-memory keyspace double with EdgeComet's
registry keys among ``filler`` unrelated keys (its SCAN walks positions, so a key written behind the
cursor waits for the next pass, as in Redis) and a pub/sub double that announces writes only while
the flags allow it. Then against real redis-servers (the suite's, and ones of our own whose CONFIG
is refused by ACL, as on a managed Redis, or that are killed and restarted), with 100,000 unrelated
``meta:cache:*`` keys, counting SCAN commands in ``INFO commandstats``.
"""

from __future__ import annotations

import fnmatch
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater

from cachesvc.recache import keys
from cachesvc.recache.discovery import MAX_BACKOFF, NOTIFICATIONS, SCAN, SCAN_PERIOD, SWEEP_PERIOD, Discovery
from cachesvc.recache.pubsub import RedisPubSub, missing_flags
from cachesvc.recache.redisclient import RedisClient, RedisError, RedisUnavailable
from cachesvc.recache.store import Store
from harness.redis_server import RedisServer

EG1, EG2, RS1 = b"registry:eg:eg-1", b"registry:eg:eg-2", b"service:render:rs-1"
FILL = """for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
  redis.call('HSET', 'meta:cache:1:1:' .. string.format('%016x', i), 'url', 'https://example.com/' .. i, 'size', '1024')
end
return 1"""


# --- doubles -------------------------------------------------------------------------------------


class Keyspace:
    """The store's registry operations over an in-memory keyspace of ``filler`` unrelated keys plus ``data``.

    A SCAN cursor is a position: a step covers ``count`` positions and returns the registry keys placed
    there (by CRC32), so what is written behind the cursor is found on the next pass.
    """

    def __init__(self, filler: int = 0, flags: str = "") -> None:
        self.filler = filler
        self.data: dict[bytes, bytes] = {}
        self.flags = flags
        self.config_get_refused = False
        self.config_set_refused = False
        self.down = False
        self.pubsub: FakePubSub | None = None
        self.calls: list[tuple[str, Any]] = []
        self.held_mget: Deferred[list[bytes | None]] | None = None

    def size(self) -> int:
        return self.filler + len(self.data)

    def set(self, key: bytes, value: bytes = b"{}") -> None:
        self.data[key] = value
        self._announce(key, b"set", "$")

    def delete(self, key: bytes, event: bytes = b"del") -> None:
        del self.data[key]
        self._announce(key, event, "x" if event == b"expired" else "g")

    def _announce(self, key: bytes, event: bytes, flag: str) -> None:
        if self.pubsub is not None and not missing_flags(self.flags, "K" + flag):
            self.pubsub.publish(key, event)

    def _check(self) -> None:
        if self.down:
            raise RedisUnavailable("Redis at test did not answer within 3s")

    def scans(self) -> list[int]:
        return [count for name, count in self.calls if name == "scan"]

    def scan_registries(self, cursor: bytes, count: int) -> Deferred[tuple[bytes, list[bytes]]]:
        self.calls.append(("scan", count))
        self._check()
        start, size = int(cursor), max(self.size(), 1)
        found = [k for k in self.data if start <= zlib.crc32(k) % size < start + count]
        return succeed((b"0" if start + count >= size else str(start + count).encode(), found))

    def read_keys(self, names: list[bytes]) -> Deferred[list[bytes | None]]:
        self.calls.append(("mget", list(names)))
        self._check()
        if self.held_mget is not None:
            held, self.held_mget = self.held_mget, None
            return held
        return succeed([self.data.get(n) for n in names])

    def key_count(self) -> Deferred[int]:
        self.calls.append(("dbsize", None))
        self._check()
        return succeed(self.size())

    def notify_flags(self) -> Deferred[str]:
        self.calls.append(("config get", None))
        self._check()
        if self.config_get_refused:
            return fail(RedisError("NOPERM this user has no permissions to run the 'config|get' command"))
        return succeed(self.flags)

    def set_notify_flags(self, flags: str) -> Deferred[Any]:
        self.calls.append(("config set", flags))
        if self.config_set_refused:
            return fail(RedisError("NOPERM this user has no permissions to run the 'config|set' command"))
        self.flags = flags
        return succeed(b"OK")

    def write_probe(self, name: str, ms: int) -> Deferred[Any]:
        self.calls.append(("probe", name))
        self._announce(name.encode(), b"set", "$")
        return succeed(b"OK")


class FakeLink:
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.patterns: list[str] = []
        self.answers_ping = True
        self.pings = 0

    @property
    def live(self) -> bool:
        return not self.lost.called

    def psubscribe(self, patterns: list[str]) -> Deferred[None]:
        self.patterns += patterns
        return succeed(None)

    def ping(self) -> Deferred[None]:
        self.pings += 1
        return succeed(None) if self.answers_ping else fail(RedisUnavailable("no PONG within 3s"))

    def close(self) -> Deferred[None]:
        if self.live:
            self.lost.callback(None)
        return succeed(None)


class FakePubSub:
    def __init__(self, keyspace: Keyspace) -> None:
        keyspace.pubsub = self
        self.keyspace = keyspace
        self.links: list[FakeLink] = []
        self.attempts: list[float] = []
        self.clock: Clock | None = None
        self.on_message: Any = None

    @property
    def link(self) -> FakeLink | None:
        return self.links[-1] if self.links and self.links[-1].live else None

    def connect(self, on_message: Any) -> Deferred[FakeLink]:
        self.attempts.append(self.clock.seconds() if self.clock else 0.0)
        if self.keyspace.down:
            return fail(RedisUnavailable("Redis error: could not connect: Connection refused"))
        self.on_message = on_message
        self.links.append(FakeLink())
        return succeed(self.links[-1])

    def publish(self, key: bytes, event: bytes) -> None:
        link = self.link
        if link is not None and any(fnmatch.fnmatchcase(f"__keyspace@0__:{key.decode()}", p) for p in link.patterns):
            self.on_message(b"__keyspace@0__:" + key, event)


class Watched:
    def __init__(self, filler: int = 0, flags: str = "", **keyspace: Any) -> None:
        self.clock = Clock()
        self.keyspace = Keyspace(filler, flags)
        for name, value in keyspace.items():
            setattr(self.keyspace, name, value)
        self.pubsub = FakePubSub(self.keyspace)
        self.pubsub.clock = self.clock
        self.discovery = Discovery(self.keyspace, self.pubsub, 0, self.clock)  # type: ignore[arg-type]

    def start(self) -> None:
        self.discovery.startService()

    def run(self, seconds: float, step: float = 0.01) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def refreshed(self) -> Any:
        d = self.discovery.refresh()
        self.run(0.05)
        assert d.called, "refresh did not answer"
        results: list[Any] = []
        d.addBoth(results.append)
        return results[0]


# --- pure parts ----------------------------------------------------------------------------------


def test_missing_flags_count_A_as_its_letters() -> None:
    assert missing_flags("", "K$gx") == "K$gx"
    assert missing_flags("AK", "K$gx") == ""
    assert missing_flags("AE", "K$gx") == "K"
    assert missing_flags("Kx", "K$gx") == "$g"
    assert missing_flags("gxE$", "K$") == "K"


def test_one_scan_match_covers_both_registries_and_no_cache_metadata() -> None:
    for key in ("registry:eg:eg-1", "registry:eg:", "service:render:rs-1", "service:render:x:y"):
        assert fnmatch.fnmatchcase(key, keys.REGISTRY_MATCH), key
    for key in ("meta:cache:1:1:0123456789abcdef", "recache:1:high", "cachesvc:inflight", "services:render:list",
                "tabs:rs-1", "registry:foo", "service:web:1"):
        assert not fnmatch.fnmatchcase(key, keys.REGISTRY_MATCH), key


# --- notifications (Clock) -----------------------------------------------------------------------


def test_flags_are_added_to_what_the_server_has_never_removed(logged: list[str]) -> None:
    w = Watched(flags="Elh")
    w.start()
    w.run(0.1)
    assert ("config set", "ElhK$gx") in w.keyspace.calls and w.keyspace.flags == "ElhK$gx"
    assert w.pubsub.link is not None and sorted(w.pubsub.link.patterns) == [
        "__keyspace@0__:cachesvc:discovery:probe:*", "__keyspace@0__:registry:eg:*",
        "__keyspace@0__:service:render:*"]
    assert w.discovery.describe() == {"mode": NOTIFICATIONS, "detail": "notify-keyspace-events=ElhK$gx",
                                      "synced": True, "gateway_keys": 0, "render_service_keys": 0,
                                      "full_passes": 1, "subscriptions": 1}
    assert any("registry discovery by keyspace notifications" in line for line in logged)
    assert not [c for c in w.keyspace.calls if c[0] == "probe"]  # CONFIG answered: no probe needed


def test_flags_already_there_are_left_alone() -> None:
    w = Watched(flags="AKE")
    w.start()
    w.run(0.1)
    assert not [c for c in w.keyspace.calls if c[0] == "config set"] and w.discovery.mode == NOTIFICATIONS


def test_a_written_key_is_known_at_once_and_one_that_is_gone_is_forgotten() -> None:
    w = Watched(filler=100_000)
    w.keyspace.data[EG1] = b'{"eg_id":"eg-1"}'
    w.start()
    w.run(1)
    assert w.refreshed() == ([b'{"eg_id":"eg-1"}'], [])
    scans = len(w.keyspace.scans())
    w.keyspace.set(RS1, b'{"id":"rs-1"}')
    w.keyspace.set(EG2, b'{"eg_id":"eg-2"}')
    assert len(w.keyspace.scans()) == scans  # no scan step in between: the notification did it
    assert w.refreshed() == ([b'{"eg_id":"eg-1"}', b'{"eg_id":"eg-2"}'], [b'{"id":"rs-1"}'])
    w.keyspace.flags = "K$"  # no expiry events: only the MGET re-read can tell the key is gone
    w.keyspace.delete(EG1, b"expired")
    assert w.discovery.describe()["gateway_keys"] == 2
    assert w.refreshed() == ([b'{"eg_id":"eg-2"}'], [b'{"id":"rs-1"}'])
    assert w.discovery.describe()["gateway_keys"] == 1
    w.keyspace.flags = "K$gx"
    w.keyspace.delete(RS1)
    assert w.discovery.describe()["render_service_keys"] == 0  # the del event: forgotten before any read


def test_a_notification_that_overtakes_the_mget_answer_keeps_its_key() -> None:
    w = Watched()
    w.start()
    w.run(0.1)
    w.keyspace.set(RS1)
    held: Deferred[list[bytes | None]] = Deferred()
    w.keyspace.held_mget = held
    d = w.discovery.render_services()
    del w.keyspace.data[RS1]  # gone when the MGET ran...
    w.keyspace.set(RS1, b"again")  # ...written again, announced on the other connection before the answer
    held.callback([None])
    assert w.discovery.describe()["render_service_keys"] == 1, "a key seen after the MGET was sent was forgotten"
    assert d.called
    assert w.refreshed() == ([], [b"again"])


def test_with_notifications_the_keyspace_is_only_swept_slowly() -> None:
    w = Watched(filler=100_000)
    w.start()
    w.run(1)
    first = sum(w.keyspace.scans())  # the full pass after subscribing
    assert first >= 100_000 and w.discovery.describe()["synced"] is True
    for _ in range(660):  # eleven minutes of 1 s ticks
        w.run(1, step=0.5)
        w.refreshed()
    swept = sum(w.keyspace.scans()) - first
    assert swept <= 100_000 * 1.2, f"{swept} keys looked at in 11 minutes"
    assert w.discovery.full_passes >= 2  # the safety net did complete a pass within SWEEP_PERIOD
    assert SWEEP_PERIOD == 600


# --- without notifications (Clock) ---------------------------------------------------------------


def test_config_refused_and_no_notification_means_scan_mode(logged: list[str]) -> None:
    w = Watched(filler=100_000, config_get_refused=True)  # flags "": the probe is never announced
    w.start()
    w.run(4)  # the probe waits 3 s
    described = w.discovery.describe()
    assert described["mode"] == SCAN and described["synced"] is True
    assert "CONFIG GET notify-keyspace-events refused" in described["detail"]
    assert "probe key's notification did not arrive" in described["detail"]
    assert [c for c in w.keyspace.calls if c[0] == "probe"]
    assert w.pubsub.link is None  # no use for a link that hears nothing
    assert any("registry discovery by incremental SCAN, a full pass every 8s" in line for line in logged)
    # A pass takes about SCAN_PERIOD: steps of at most 5,000 keys.
    w.run(2)
    before = sum(w.keyspace.scans())
    w.run(SCAN_PERIOD)
    looked = sum(w.keyspace.scans()) - before
    assert 100_000 * 0.8 <= looked <= 100_000 * 1.3 and max(w.keyspace.scans()[3:]) <= 5000
    # A newcomer, written without any announcement, is found within a pass.
    w.keyspace.data[EG2] = b"new"
    started = w.clock.seconds()
    while EG2 not in [k for k in w.discovery._known]:
        w.run(0.1)
        assert w.clock.seconds() - started <= SCAN_PERIOD + 0.5, "not found within a scan period"


def test_config_refused_but_notifications_on_is_notifications_mode() -> None:
    w = Watched(flags="K$", config_get_refused=True)  # set in redis.conf by the provider
    w.start()
    w.run(0.1)
    described = w.discovery.describe()
    assert described["mode"] == NOTIFICATIONS and "yet a probe key's notification arrived" in described["detail"]
    w.keyspace.set(EG1)
    assert described["gateway_keys"] == 0 and w.discovery.describe()["gateway_keys"] == 1


def test_config_set_refused_without_the_flags_is_scan_mode_then_retried() -> None:
    w = Watched(flags="", config_set_refused=True)
    w.start()
    w.run(0.1)
    assert w.discovery.mode == SCAN and "CONFIG SET refused" in w.discovery.detail
    w.keyspace.config_set_refused = False  # the operator allows it
    w.run(61)
    assert w.discovery.mode == NOTIFICATIONS and w.keyspace.flags == "K$gx"


def test_a_lost_link_means_scan_mode_until_resubscribed_with_a_full_pass() -> None:
    w = Watched(filler=50_000)
    w.start()
    w.run(1)
    passes = w.discovery.full_passes
    assert w.pubsub.link is not None
    w.keyspace.down = True
    w.pubsub.link.close()
    assert w.discovery.mode == SCAN and "lost" in w.discovery.detail
    w.run(2)
    w.keyspace.data[EG1] = b"written while nobody listened"  # (a restarted Redis forgot the flags too)
    w.keyspace.flags = ""
    w.keyspace.down = False
    w.run(MAX_BACKOFF + 0.5)
    assert w.discovery.describe()["subscriptions"] == 2 and w.discovery.mode == NOTIFICATIONS
    assert w.keyspace.flags == "K$gx"
    assert w.discovery.full_passes > passes
    assert w.refreshed() == ([b"written while nobody listened"], [])


def test_connection_attempts_back_off_up_to_5s() -> None:
    w = Watched(down=True)
    w.start()
    w.run(20)
    gaps = [round(b - a, 1) for a, b in zip(w.pubsub.attempts, w.pubsub.attempts[1:], strict=False)]
    assert gaps[:5] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert "no pub/sub connection" in w.discovery.detail and "Connection refused" in w.discovery.detail


def test_flags_removed_by_another_client_are_noticed_and_put_back() -> None:
    w = Watched()
    w.start()
    w.run(0.1)
    w.keyspace.flags = "E"  # someone else's CONFIG SET
    w.run(10.5)  # the next check notices, drops the link...
    assert w.discovery.mode == SCAN
    w.run(1.5)  # ...and the reconnect adds the flags back
    assert w.discovery.describe()["subscriptions"] == 2 and w.keyspace.flags == "EK$gx"
    assert w.discovery.mode == NOTIFICATIONS


def test_an_unanswered_ping_drops_the_link_and_reconnects() -> None:
    w = Watched()
    w.start()
    w.run(0.1)
    assert w.pubsub.link is not None
    w.pubsub.link.answers_ping = False
    w.run(10.5)
    assert w.discovery.mode == SCAN
    w.run(1.5)
    assert w.discovery.describe()["subscriptions"] == 2 and w.discovery.mode == NOTIFICATIONS


def test_a_surprise_while_subscribing_or_checking_is_logged_and_never_stops_the_watcher(logged: list[str]) -> None:
    w = Watched()
    attempts: list[int] = []
    connect = w.pubsub.connect

    def surprising(on_message: Any) -> Deferred[FakeLink]:
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("surprise")
        return connect(on_message)

    w.pubsub.connect = surprising  # type: ignore[method-assign]
    w.start()
    w.run(1.5)
    assert len(attempts) == 2 and w.discovery.mode == NOTIFICATIONS
    assert any("subscribing failed" in line for line in logged)

    def broken() -> Deferred[str]:
        raise ValueError("surprise")

    w.keyspace.notify_flags = broken  # type: ignore[method-assign]
    w.run(25)
    assert w.discovery._checks.running and any("check failed" in line for line in logged)


def test_reads_wait_for_the_first_pass_and_fail_at_once_while_redis_is_down() -> None:
    w = Watched(down=True)
    w.start()
    w.run(0.1)
    failure = w.refreshed()
    assert isinstance(failure.value, RedisUnavailable)
    w.keyspace.down = False
    w.run(2)
    assert w.refreshed() == ([], [])


def test_status_reads_catch_up_with_the_notifications_first() -> None:
    w = Watched()
    w.start()
    w.run(0.1)
    assert w.pubsub.link is not None
    pings = w.pubsub.link.pings
    w.discovery.render_services(catch_up=True)
    w.discovery.render_services()
    assert w.pubsub.link.pings == pings + 1


def test_stop_closes_the_link_and_scans_no_more() -> None:
    w = Watched(filler=10_000)
    w.start()
    w.run(1)
    link = w.pubsub.link
    w.discovery.stopService()
    assert link is not None and not link.live
    calls = len(w.keyspace.calls)
    w.run(30)
    assert len(w.keyspace.calls) == calls


# --- against real redis-servers ------------------------------------------------------------------


def fill(client: Any, count: int, chunk: int = 25_000) -> None:
    """*count* unrelated ``meta:cache:*`` hashes, made by a Lua loop in chunks."""
    for start in range(0, count, chunk):
        client.eval(FILL, 0, start, min(count, start + chunk) - 1)


def scans(client: Any) -> int:
    return int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


async def sleep(seconds: float) -> None:
    await deferLater(global_reactor, seconds, lambda: None)


async def wait_for(check: Any, timeout: float, what: str) -> float:
    """Poll *check* (sync or returning a Deferred) until true; the seconds it took."""
    started = time.monotonic()
    while True:
        value = check()
        if isinstance(value, Deferred):
            value = await value
        if value:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not within {timeout}s")
        await sleep(0.05)


class Real:
    """A started Discovery over a real RedisClient."""

    def __init__(self, addr: str, password: str = "") -> None:
        self.redis = RedisClient(addr, password, 0, global_reactor, timeout=3.0)
        self.discovery = Discovery(Store(self.redis), RedisPubSub(addr, password, 0, global_reactor), 0,
                                   global_reactor)
        self.discovery.startService()

    async def gateways(self) -> list[bytes]:
        d = self.discovery.refresh()
        d.addTimeout(10, global_reactor)
        return (await d).gateways

    async def close(self) -> None:
        await self.discovery.stopService()
        await self.redis.stopService()


@pytest.fixture
def own_redis() -> Iterator[Any]:
    """A redis-server of this test's own (it may be restarted or have CONFIG refused), and a client of it."""
    import redis as redis_py

    server = RedisServer()
    server.start()
    client = redis_py.Redis(host="127.0.0.1", port=server.port)
    try:
        yield server, client
    finally:
        client.close()
        server.close()


def refuse_config(client: Any) -> None:
    """As a managed Redis does: the default user may run everything but CONFIG."""
    client.execute_command("ACL", "SETUSER", "default", "-config")


@pytest_twisted.ensureDeferred
async def test_real_redis_notifications_find_a_new_key_at_once_and_reads_scan_nothing(
        redis: Any, redis_server: Any) -> None:
    fill(redis, 100_000)
    redis.config_set("notify-keyspace-events", "El")  # someone else's flags: kept
    real = Real(redis_server.addr)
    try:
        await wait_for(lambda: real.discovery.describe()["synced"], 10, "first full pass")
        assert real.discovery.mode == NOTIFICATIONS
        assert set(redis.config_get("notify-keyspace-events")["notify-keyspace-events"]) >= set("ElK$gx")
        before = scans(redis)
        for _ in range(20):  # 2 s of 100 ms ticks
            assert await real.gateways() == []
            await sleep(0.1)
        assert scans(redis) - before <= 4, "reads scanned the keyspace"
        redis.set(EG1, b'{"eg_id":"eg-1"}', ex=60)
        took = await wait_for(lambda: real.discovery.describe()["gateway_keys"] == 1, 10, "new gateway")
        assert took < 1.0 and await real.gateways() == [b'{"eg_id":"eg-1"}']
        redis.delete(EG1)
        await wait_for(lambda: real.discovery.describe()["gateway_keys"] == 0, 2, "the del noticed")
    finally:
        await real.close()


@pytest_twisted.ensureDeferred
async def test_real_redis_with_config_refused_scans_in_bounded_steps_and_finds_a_newcomer(own_redis: Any) -> None:
    server, client = own_redis
    fill(client, 100_000)
    refuse_config(client)
    real = Real(server.addr)
    try:
        await wait_for(lambda: real.discovery.describe()["synced"], 10, "first full pass")
        await wait_for(lambda: real.discovery.mode == SCAN and "probe" in real.discovery.detail, 10, "scan mode")
        assert "NOPERM" in real.discovery.detail
        await sleep(1)
        before, started = scans(client), time.monotonic()
        await sleep(4)
        calls = (scans(client) - before) / (time.monotonic() - started)
        # A full pass of 100,000 keys in steps of at most 5,000, spread over 8 s: about 2.5 steps a second.
        assert calls <= 4, f"{calls:.1f} SCAN calls a second"
        client.set(RS1, b'{"id":"rs-1"}', ex=60)
        took = await wait_for(lambda: real.discovery.describe()["render_service_keys"] == 1, 10, "new RS")
        assert took <= SCAN_PERIOD + 1
    finally:
        await real.close()


@pytest_twisted.ensureDeferred
async def test_real_redis_with_config_refused_but_notifications_on_uses_them(own_redis: Any) -> None:
    server, client = own_redis
    client.config_set("notify-keyspace-events", "K$")  # the provider's setting
    refuse_config(client)
    real = Real(server.addr)
    try:
        await wait_for(lambda: real.discovery.mode == NOTIFICATIONS, 10, "notifications mode")
        assert "probe" in real.discovery.detail and client.keys("cachesvc:discovery:probe:*") != []
        client.set(EG2, b"{}", ex=60)
        assert await wait_for(lambda: real.discovery.describe()["gateway_keys"] == 1, 10, "new gateway") < 1.0
    finally:
        await real.close()


@pytest_twisted.ensureDeferred
async def test_real_redis_restart_resubscribes_and_runs_a_full_pass(own_redis: Any) -> None:
    server, client = own_redis
    real = Real(server.addr)
    try:
        await wait_for(lambda: real.discovery.mode == NOTIFICATIONS, 10, "notifications mode")
        passes = real.discovery.full_passes
        server.stop()
        await wait_for(lambda: real.discovery.mode == SCAN, 5, "the lost link noticed")
        server.start()  # empty, and its notify-keyspace-events is back to ""
        client.set(EG1, b"registered while the watcher was away", ex=60)
        await wait_for(lambda: real.discovery.describe()["subscriptions"] == 2, 15, "resubscribed")
        assert real.discovery.mode == NOTIFICATIONS
        assert set(client.config_get("notify-keyspace-events")["notify-keyspace-events"]) >= set("K$gx")
        await wait_for(lambda: real.discovery.full_passes > passes, 5, "a full pass after the reconnect")
        assert await real.gateways() == [b"registered while the watcher was away"]
        client.set(EG2, b"after", ex=60)
        await wait_for(lambda: real.discovery.describe()["gateway_keys"] == 2, 2, "notified again")
    finally:
        await real.close()


@pytest_twisted.ensureDeferred
async def test_real_redis_a_refused_password_is_reported_and_retried_until_fixed(own_redis: Any) -> None:
    server, client = own_redis
    client.config_set("requirepass", "right")
    real = Real(server.addr, password="wrong")
    try:
        await wait_for(lambda: "no pub/sub connection" in real.discovery.detail, 10, "the refusal reported")
        assert "WRONGPASS" in real.discovery.detail or "auth" in real.discovery.detail.lower(), real.discovery.detail
        client.config_set("requirepass", "wrong")  # fixed on the Redis side
        await wait_for(lambda: real.discovery.mode == NOTIFICATIONS, 15, "subscribed once the password works")
    finally:
        await real.close()
