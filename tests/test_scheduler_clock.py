"""The Scheduler in-process: a ``Clock`` and in-memory doubles of the store, ledger and dispatcher.

The doubles implement exactly what the scheduler calls (``store.queue_counts``; the registry
watcher's ``refresh`` and ``render_services``, played by the store double over its ``registry_values``,
``registered`` and ``values``; ``ledger.claim``, ``settle``, ``reap``; ``dispatcher.send``,
``close``) and record every call, so each test can hold a step open with an unfired Deferred and
look at what the scheduler did around it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, TimeoutError, fail, inlineCallbacks, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from cachesvc import config
from cachesvc.metrics import Metrics
from cachesvc.recache.dispatch import Gateway
from cachesvc.recache.keys import EG_REGISTRY, PRIORITIES, RS_REGISTRY
from cachesvc.recache.ledger import Budget, Claim, ClaimResult
from cachesvc.recache.members import encode_member
from cachesvc.recache.redisclient import RedisUnavailable
from cachesvc.recache.registry import format_go_time
from cachesvc.recache.scheduler import Scheduler
from cachesvc.recache.settings import RecacheSettings
from cachesvc.recache.state import SchedulerState
from cachesvc.recache.store import QueueCount

T0 = 1767225600.0  # 2026-01-01T00:00:00Z
EG = {"eg_id": "eg-1", "address": "10.0.0.5:10071", "sharding_enabled": True}
GATEWAY = Gateway("eg-1", "http://10.0.0.5:10071")


# --- doubles -------------------------------------------------------------------------------------


class FakeStore:
    """The registries and queue counts; ``fail_next`` makes the next registry read fail."""

    def __init__(self, clock: Clock, capacity: int = 10, load: int = 0) -> None:
        self.clock = clock
        self.capacity = capacity
        self.load = load
        self.gateways: list[dict[str, Any]] = [EG]
        self.calls: list[tuple[str, Any]] = []
        self.fail_next: Exception | None = None

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    def registry_values(self, pattern: str) -> Deferred[list[bytes]]:
        self.calls.append(("registry_values", pattern))
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            return fail(error)
        assert pattern == EG_REGISTRY
        return succeed([json.dumps(g).encode() for g in self.gateways])

    def registered(self, pattern: str) -> Deferred[list[bytes]]:
        self.calls.append(("registered", pattern))
        assert pattern == RS_REGISTRY
        return succeed([b"service:render:rs-1"])

    def values(self, names: list[bytes]) -> Deferred[list[bytes]]:
        self.calls.append(("values", list(names)))
        seen = format_go_time(self.clock.seconds())
        rs = {"id": "rs-1", "capacity": self.capacity, "load": self.load, "last_seen": seen}
        return succeed([json.dumps(rs).encode() for n in names if n == b"service:render:rs-1"])

    @inlineCallbacks
    def refresh(self) -> Any:  # the registry watcher's read on every tick
        gateways = yield self.registry_values(EG_REGISTRY)
        names = yield self.registered(RS_REGISTRY)
        return gateways, (yield self.values(names))

    def render_services(self) -> Deferred[list[bytes]]:  # and on every refill
        return self.values([b"service:render:rs-1"])

    def queue_counts(self, host_ids: list[int], now: int) -> Deferred[dict[int, dict[str, QueueCount]]]:
        self.calls.append(("queue_counts", (list(host_ids), now)))
        return succeed({h: {p: QueueCount(2, 1) for p in PRIORITIES} for h in host_ids})


class FakeLedger:
    """Hands out the claims queued in ``batches`` (a list of claims, or a Deferred to hold a cycle open).

    Settles are answered on the next reactor turn, as the real ledger batches them (``callLater(0)``);
    ``synchronous = True`` answers them at once.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.synchronous = False
        self.batches: list[list[Claim] | Deferred[ClaimResult]] = []
        self.claims: list[dict[str, Any]] = []
        self.settled: list[tuple[bytes, str, tuple[Any, ...], dict[str, Any]]] = []
        self.reaps = 0
        self.retry_answer = "retry"
        self.online_answers: list[tuple[int, int]] = []  # (online, least_online) of the next answers (then 0, 0)

    def claim(self, line: int, load: int, snapshot: float, online: int | None, limit: int, host_ids: list[int],
              classes: int) -> Deferred[ClaimResult]:
        self.claims.append({"line": line, "load": load, "online": online, "limit": limit, "hosts": list(host_ids),
                            "classes": classes})
        batch = self.batches.pop(0) if self.batches else []
        if isinstance(batch, Deferred):
            return batch
        online, least = self.online_answers.pop(0) if self.online_answers else (0, 0)
        return succeed(result(batch, online=online, least=least))

    def settle(self, claim: Claim, action: str, *args: Any, **kwargs: Any) -> Deferred[str]:
        self.settled.append((claim.member, action, args, kwargs))
        answer = self.retry_answer if action == "retry" else action
        if self.synchronous:
            return succeed(answer)
        d: Deferred[str] = Deferred()
        self.clock.callLater(0, d.callback, answer)
        return d

    def reap(self, batch: int = 500) -> Deferred[int]:
        self.reaps += 1
        return succeed(0)

    def actions(self) -> dict[bytes, str]:
        return {member: action for member, action, _, _ in self.settled}


class FakeDispatcher:
    """``answers[url]``: an int status, an exception, or None to leave the request unanswered."""

    def __init__(self) -> None:
        self.answers: dict[str, int | Exception | None] = {}
        self.sent: list[tuple[Gateway, str, int, int]] = []
        self.pending: dict[str, Deferred[int]] = {}
        self.closed = 0

    def send(self, gateway: Gateway, url: str, host_id: int, dimension_id: int) -> Deferred[int]:
        self.sent.append((gateway, url, host_id, dimension_id))
        answer = self.answers.get(url, 200)
        if answer is None:
            d: Deferred[int] = Deferred()
            self.pending[url] = d
            return d
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def close(self) -> Deferred[None]:
        self.closed += 1
        return succeed(None)


def result(claims: list[Claim], more_normal: bool = False, online: int = 0, least: int | None = None) -> ClaimResult:
    least = online if least is None else least
    budget = Budget(budget=7, unreflected=0, online=online, in_flight=0, least_online=least)
    return ClaimResult(budget, more_normal, claims)


def claim(url: str, host_id: int = 1, dimension_id: int = 1, priority: str = "high") -> Claim:
    return Claim(f"recache:{host_id}:{priority}".encode(), encode_member(url, dimension_id), b"1767225600", 0, b"token")


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> RecacheSettings:
    (tmp_path / "hosts.d").mkdir()
    (tmp_path / "hosts.d" / "a.yaml").write_text(
        "hosts:\n  - id: 1\n    domain: a.example\n    dimensions: {desktop: {id: 1}}\n"
        "  - id: 2\n    domain: b.example\n")
    (tmp_path / "edge-gateway.yaml").write_text("internal: {auth_key: k}\nhosts: {include: hosts.d}\n")
    conf = tmp_path / "cd.yaml"
    conf.write_text(
        "eg_config: edge-gateway.yaml\ndaemon_id: cd-test\nredis: {addr: '127.0.0.1:1'}\n"
        "scheduler: {tick_interval: 1s, normal_check_interval: 60s}\n"
        "internal_queue: {max_size: 100, max_retries: 3, retry_base_delay: 5s}\n"
        "recache: {rs_capacity_reserved: 0.30, timeout_per_url: 60s, shutdown_grace: 10s, gateway_cooldown: 5s}\n")
    resolved = config.resolve(str(conf)).recache
    assert resolved is not None
    return resolved


class Harness:
    def __init__(self, settings: RecacheSettings) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = FakeStore(self.clock)
        self.ledger = FakeLedger(self.clock)
        self.dispatcher = FakeDispatcher()
        self.state = SchedulerState(started_at=T0, max_size=settings.max_size)
        self.scheduler = Scheduler(settings, self.store, self.ledger, self.dispatcher, self.state,  # type: ignore[arg-type]
                                   self.clock, Metrics(), self.store)

    def start(self) -> None:
        self.scheduler.startService()

    def tick(self) -> None:
        """Advance to the next tick and let every callLater(0) it causes run."""
        self.clock.advance(1.0)
        self.settle()

    def settle(self) -> None:
        for _ in range(10):
            self.clock.advance(0)


@pytest.fixture
def h(settings: RecacheSettings) -> Iterator[Harness]:
    harness = Harness(settings)
    yield harness
    if harness.scheduler.running:
        harness.scheduler.stopService()
        harness.clock.advance(60)


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# --- (a) a tick during a refill keeps its full work ----------------------------------------------


def test_tick_during_a_running_refill_does_its_full_work_when_the_refill_ends(h: Harness) -> None:
    """The bug 2736899 fixed: a tick that arrives while a refill cycle runs must not be served as a refill.

    Before 2736899 the busy cycle only set ``_again`` and, when it ended, scheduled a *refill*
    (``_cycle(full=False)``): no registry reads, no lease reaping, no queue-depth metrics for that
    tick, until the following tick happened to find the scheduler idle.
    """
    h.dispatcher.answers["https://a.example/1"] = None  # held until the test answers it
    h.ledger.batches = [[claim("https://a.example/1")]]
    h.start()
    h.tick()  # tick 1: discovery, reap, counts, claim -> one request in flight
    assert (h.ledger.reaps, h.store.count("queue_counts"), h.store.count("registry_values")) == (1, 1, 1)
    assert len(h.dispatcher.sent) == 1

    held: Deferred[ClaimResult] = Deferred()
    h.ledger.batches = [held]
    h.dispatcher.pending.pop("https://a.example/1").callback(200)  # answered: ack, then a refill
    h.clock.advance(0)
    assert h.ledger.actions() == {encode_member("https://a.example/1", 1): "ack"}
    assert len(h.ledger.claims) == 2  # the refill is claiming, and its claim is held open
    assert (h.ledger.reaps, h.store.count("registry_values")) == (1, 1)  # a refill does no discovery

    h.clock.advance(1.0)  # tick 2 arrives while the refill is still running
    assert h.state.last_tick == T0 + 2.0
    assert h.ledger.reaps == 1  # not now: one cycle at a time

    held.callback(result([]))  # the refill ends
    h.clock.advance(0.01)  # well before tick 3
    assert h.ledger.reaps == 2, "the tick's lease reaping was dropped"
    assert h.store.count("queue_counts") == 2, "the tick's queue-depth metrics were dropped"
    assert (h.store.count("registry_values"), h.store.count("registered")) == (2, 2), "the tick's discovery was dropped"
    assert len(h.ledger.claims) == 3  # and it claimed, as a tick does


def test_queued_tick_reads_the_gateway_registry_again(h: Harness) -> None:
    """Discovery during the queued tick takes effect: a gateway registered meanwhile gets the next claim."""
    h.dispatcher.answers["https://a.example/1"] = None
    h.ledger.batches = [[claim("https://a.example/1")]]
    h.start()
    h.tick()
    held: Deferred[ClaimResult] = Deferred()
    h.ledger.batches = [held, [claim("https://a.example/2")]]
    h.dispatcher.pending.pop("https://a.example/1").callback(200)
    h.clock.advance(0)
    h.store.gateways = [{"eg_id": "eg-9", "address": ":10071", "sharding_enabled": True}]
    h.clock.advance(1.0)
    held.callback(result([]))
    h.clock.advance(0.01)
    assert h.dispatcher.sent[-1] == (Gateway("eg-9", "http://127.0.0.1:10071"), "https://a.example/2", 1, 1)


# --- (b) send and settle -------------------------------------------------------------------------


def test_each_claim_is_sent_once_and_settled_by_its_answer(h: Harness, settings: RecacheSettings) -> None:
    h.dispatcher.answers.update({"https://a.example/ok": 200, "https://a.example/err": 500,
                                 "https://a.example/gone": 404, "https://b.example/bad": 400})
    claims = [claim("https://a.example/ok"), claim("https://a.example/err", priority="normal"),
              claim("https://a.example/gone", dimension_id=0),
              claim("https://b.example/bad", host_id=2, dimension_id=0)]
    h.ledger.batches = [claims]
    h.start()
    h.tick()
    assert h.ledger.claims[0]["line"] == 7  # (1 - 0.30) x capacity 10
    assert h.ledger.claims[0]["limit"] == settings.max_size
    assert sorted(h.ledger.claims[0]["hosts"]) == [1, 2]
    assert h.dispatcher.sent == [
        (GATEWAY, "https://a.example/ok", 1, 1), (GATEWAY, "https://a.example/err", 1, 1),
        (GATEWAY, "https://a.example/gone", 1, 0), (GATEWAY, "https://b.example/bad", 2, 0),
    ]
    assert h.ledger.actions() == {
        encode_member("https://a.example/ok", 1): "ack",
        encode_member("https://a.example/err", 1): "retry",
        encode_member("https://a.example/gone", 0): "dead",
        encode_member("https://b.example/bad", 0): "dead",
    }
    by_member = {m: (args, kwargs) for m, _, args, kwargs in h.ledger.settled}
    retry_args, retry_kwargs = by_member[encode_member("https://a.example/err", 1)]
    assert retry_args == (settings.retry_base_delay, settings.max_retries)
    assert "HTTP 500" in retry_kwargs["reason"] and "eg-1" in retry_kwargs["reason"]
    _, dead_kwargs = by_member[encode_member("https://a.example/gone", 0)]
    assert "HTTP 404" in dead_kwargs["reason"] and dead_kwargs["failed_at"] == int(T0 + 1)
    assert h.state.size == 0
    registry = h.scheduler.metrics.registry
    assert registry.get_sample_value("edgecomet_cd_in_flight") == 0
    requests = "edgecomet_cd_recache_requests_total"
    assert registry.get_sample_value(requests, {"status": "success", "queue_type": "high"}) == 1
    assert registry.get_sample_value(requests, {"status": "client_error", "queue_type": "high"}) == 2
    assert registry.get_sample_value(requests, {"status": "failure", "queue_type": "normal"}) == 1
    assert registry.get_sample_value("edgecomet_cd_queue_depth", {"queue_type": "high"}) == 4  # 2 per host, 2 hosts


def test_no_usable_gateway_releases_the_claim_untouched(h: Harness) -> None:
    """The only gateway timed out while a claim was on its way back from Redis: that claim goes back as it was."""
    h.dispatcher.answers["https://a.example/slow"] = None
    h.ledger.batches = [[claim("https://a.example/slow")]]
    h.start()
    h.tick()
    held: Deferred[ClaimResult] = Deferred()
    h.ledger.batches = [held]
    h.clock.advance(1.0)  # tick 2 claims; its answer is held
    assert len(h.ledger.claims) == 2
    h.dispatcher.pending.pop("https://a.example/slow").errback(TimeoutError())  # the gateway goes to rest
    h.clock.advance(0)
    held.callback(result([claim("https://a.example/next")]))
    h.clock.advance(0)
    assert [url for _, url, _, _ in h.dispatcher.sent] == ["https://a.example/slow"]  # the second was never sent
    assert h.ledger.actions() == {encode_member("https://a.example/slow", 1): "retry",
                                  encode_member("https://a.example/next", 1): "release"}
    release = [s for s in h.ledger.settled if s[1] == "release"]
    assert release[0][2:] == ((), {})  # no delay, no attempt counted
    assert "TimeoutError" in h.ledger.settled[0][3]["reason"]
    # While the gateway rests (5 s from T0 + 2) nothing is claimed; after the cool-down claiming resumes.
    for _ in range(4):
        h.tick()
    assert len(h.ledger.claims) == 2
    h.tick()
    assert len(h.ledger.claims) >= 3


def test_a_refused_connection_rests_the_gateway_for_the_rest_of_the_batch(h: Harness) -> None:
    h.dispatcher.answers["https://a.example/refused"] = ConnectionRefusedError()
    h.ledger.batches = [[claim("https://a.example/refused"), claim("https://a.example/next")]]
    h.start()
    h.tick()
    assert [url for _, url, _, _ in h.dispatcher.sent] == ["https://a.example/refused"]
    assert h.ledger.actions() == {encode_member("https://a.example/refused", 1): "retry",
                                  encode_member("https://a.example/next", 1): "release"}


def test_answered_claims_free_their_place_in_the_internal_queue(h: Harness, settings: RecacheSettings) -> None:
    h.ledger.batches = [[claim(f"https://a.example/{i}") for i in range(3)]]
    h.start()
    h.tick()
    assert len(h.ledger.settled) == 3
    h.tick()
    assert [c["limit"] for c in h.ledger.claims] == [settings.max_size] * len(h.ledger.claims)
    assert h.state.size == 0


def test_claims_settled_synchronously_free_their_place_too(h: Harness, settings: RecacheSettings) -> None:
    h.ledger.synchronous = True
    h.ledger.batches = [[claim(f"https://a.example/{i}") for i in range(3)]]
    h.start()
    h.tick()
    h.tick()
    assert [c["limit"] for c in h.ledger.claims] == [settings.max_size] * len(h.ledger.claims)


def test_undecodable_member_is_dead_lettered_without_a_request(h: Harness) -> None:
    bad = Claim(b"recache:1:high", b"not-valid-json", b"1", 0, b"t")
    h.ledger.batches = [[bad]]
    h.start()
    h.tick()
    assert h.dispatcher.sent == []
    [(member, action, _, kwargs)] = h.ledger.settled
    assert (member, action) == (b"not-valid-json", "dead") and kwargs["reason"].startswith("undecodable member")


def test_every_answer_triggers_a_refill_before_the_next_tick(h: Harness) -> None:
    h.ledger.batches = [[claim("https://a.example/1")], [claim("https://a.example/2")], [claim("https://a.example/3")]]
    h.start()
    h.clock.advance(1.0)
    h.settle()
    assert h.clock.seconds() == T0 + 1.0
    assert [url for _, url, _, _ in h.dispatcher.sent] == ["https://a.example/1", "https://a.example/2", "https://a.example/3"]
    assert h.ledger.reaps == 1  # refills are not ticks


def test_the_online_load_estimate_is_carried_from_claim_to_claim_and_never_aged_out(h: Harness) -> None:
    """Each claim gets the online load the previous one answered with, however long ago that was.

    The estimate used to be the highest sample of the last tick only: on a slow machine no sample was
    left by the next claim, and one snapshot that did not show requests still on their way to the
    gateway made the budget 18 too large (the capacity line overshot, 48 renders for a budget of 30).
    """
    h.ledger.online_answers = [(40, 40), (43, 43)]
    h.start()
    h.tick()
    for _ in range(5):  # ticks, well past any window
        h.clock.advance(10.0)
        h.settle()
    assert [c["online"] for c in h.ledger.claims] == [None, 40, 43, 0, 0, 0]


def test_a_lasting_doubt_about_the_estimate_holds_claims_then_refills(h: Harness, settings: RecacheSettings) -> None:
    """Snapshots allow 10 online for 2 s against an estimate of 40: claims wait (limit 0, still measured).

    With nothing of this daemon's in flight the next answer is exact; the hold ends and a refill
    claims at once, before the next tick.
    """
    h.ledger.online_answers = [(40, 10)] * 4
    h.start()
    for _ in range(3):
        h.tick()
    assert h.scheduler.online.holding  # the third answer: doubted for 2 s
    h.tick()
    # The fourth claim only measured; nothing of ours in flight, so the hold ended and a refill claimed.
    assert [c["limit"] for c in h.ledger.claims] == [settings.max_size] * 3 + [0, settings.max_size]
    assert h.clock.seconds() == T0 + 4.0 and not h.scheduler.online.holding


# --- (c) paused ----------------------------------------------------------------------------------


def test_paused_ticks_claim_nothing_but_keep_ticking(h: Harness) -> None:
    h.ledger.batches = [[claim("https://a.example/1")]]
    h.state.paused = True
    h.start()
    for _ in range(5):
        h.tick()
    assert h.ledger.claims == [] and h.dispatcher.sent == []
    assert h.state.last_tick == T0 + 5.0
    h.state.paused = False
    h.tick()
    assert h.ledger.claims and [url for _, url, _, _ in h.dispatcher.sent] == ["https://a.example/1"]


def test_pausing_stops_refills_too(h: Harness) -> None:
    h.dispatcher.answers["https://a.example/1"] = None
    h.ledger.batches = [[claim("https://a.example/1")], [claim("https://a.example/2")]]
    h.start()
    h.tick()
    h.state.paused = True
    h.dispatcher.pending.pop("https://a.example/1").callback(200)  # in-flight work finishes while paused
    h.settle()
    assert h.ledger.actions() == {encode_member("https://a.example/1", 1): "ack"}
    assert len(h.ledger.claims) == 1  # but the refill it asks for claims nothing


# --- (d) one bad tick never stops the loop -------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError("boom"), RedisUnavailable("Redis at x did not answer SCAN")])
def test_a_failing_tick_does_not_stop_the_loop(h: Harness, logged: list[dict[str, Any]], error: Exception) -> None:
    h.start()
    h.tick()
    assert len(h.ledger.claims) == 1
    h.store.fail_next = error
    h.tick()
    assert len(h.ledger.claims) == 1  # that tick claimed nothing
    assert h.scheduler.loop.running
    assert any(error is getattr(e.get("log_failure"), "value", None) or str(error) in str(e.get("reason", ""))
               for e in logged), "the failure was not logged"
    h.tick()
    h.tick()
    assert len(h.ledger.claims) == 3 and h.state.last_tick == T0 + 4.0


def test_a_store_that_raises_synchronously_does_not_stop_the_loop(h: Harness) -> None:
    def explode(pattern: str) -> Deferred[list[bytes]]:
        raise ValueError("synchronous")

    h.start()
    h.store.registry_values = explode  # type: ignore[method-assign]
    h.tick()
    h.tick()
    assert h.scheduler.loop.running and h.ledger.claims == []
    del h.store.registry_values
    h.tick()
    assert len(h.ledger.claims) == 1


# --- (e) stopping --------------------------------------------------------------------------------


def test_stop_waits_for_in_flight_up_to_the_grace_then_releases_the_rest(h: Harness, settings: RecacheSettings) -> None:
    for url in ("https://a.example/1", "https://a.example/2", "https://a.example/3"):
        h.dispatcher.answers[url] = None
    h.ledger.batches = [[claim("https://a.example/1"), claim("https://a.example/2"), claim("https://a.example/3")]]
    h.start()
    h.tick()
    assert len(h.dispatcher.pending) == 3 and h.state.size == 3

    stopped = h.scheduler.stopService()
    assert not stopped.called
    h.clock.advance(settings.shutdown_grace / 2)
    h.dispatcher.pending.pop("https://a.example/1").callback(200)
    h.clock.advance(0)
    assert not stopped.called and h.ledger.actions() == {encode_member("https://a.example/1", 1): "ack"}
    assert h.dispatcher.closed == 0

    h.clock.advance(settings.shutdown_grace / 2 - 0.01)
    assert not stopped.called  # still within the grace
    h.clock.advance(0.02)
    assert stopped.called
    assert h.ledger.actions() == {encode_member("https://a.example/1", 1): "ack",
                                  encode_member("https://a.example/2", 1): "release",
                                  encode_member("https://a.example/3", 1): "release"}
    assert h.dispatcher.closed == 1
    assert not h.scheduler.loop.running
    claims_before = len(h.ledger.claims)
    for _ in range(3):
        h.tick()
    assert len(h.ledger.claims) == claims_before  # no tick, no refill after the stop


def test_stop_finishes_as_soon_as_in_flight_work_is_answered(h: Harness) -> None:
    h.dispatcher.answers["https://a.example/1"] = None
    h.ledger.batches = [[claim("https://a.example/1")]]
    h.start()
    h.tick()
    stopped = h.scheduler.stopService()
    h.clock.advance(1)
    assert not stopped.called
    h.dispatcher.pending.pop("https://a.example/1").callback(500)
    h.clock.advance(0)
    assert stopped.called  # long before the 10 s grace
    assert h.ledger.actions() == {encode_member("https://a.example/1", 1): "retry"}  # answered, so not released
    assert h.dispatcher.closed == 1
    assert h.clock.getDelayedCalls() == []  # the grace timer was cancelled


def test_stop_with_nothing_in_flight_closes_at_once(h: Harness) -> None:
    h.start()
    h.tick()
    stopped = h.scheduler.stopService()
    assert stopped.called and h.dispatcher.closed == 1 and h.ledger.settled == []


def test_a_claim_that_lands_during_the_stop_is_released_not_sent(h: Harness) -> None:
    held: Deferred[ClaimResult] = Deferred()
    h.ledger.batches = [held]
    h.start()
    h.tick()  # the tick's claim is on its way back from Redis
    stopped = h.scheduler.stopService()
    held.callback(result([claim("https://a.example/late")]))
    h.clock.advance(0)
    assert h.dispatcher.sent == []  # nothing is sent once the stop has begun
    assert h.ledger.actions() == {encode_member("https://a.example/late", 1): "release"}
    h.clock.advance(0)
    assert stopped.called and h.dispatcher.closed == 1
