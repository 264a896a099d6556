"""The claim, settle and reap scripts against the suite's real redis-server: the render budget.

The scripts run as the ledger sends them (the same KEYS and ARGV), straight through redis-py, so each
case is one synchronous step with snapshot times set against Redis's own clock.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cachesvc.recache import keys
from cachesvc.recache.redisclient import Script

CLAIM, SETTLE, REAP = Script("claim"), Script("settle"), Script("reap")
QUEUE = keys.queue_key(1, "normal")
LINE = 70  # capacity 100, 30 % reserved


def redis_now(redis: Any) -> float:
    seconds, micros = redis.time()
    return float(seconds) + micros / 1_000_000


def claim(redis: Any, load: int, snapshot: float, online: int, limit: int = 1000, lease: float = 60.0,
          line: int = LINE) -> dict[str, Any]:
    """One claim over host 1 (every priority); *online* is the caller's estimate, -1 for none."""
    queues = [keys.queue_key(1, p) for p in keys.PRIORITIES]
    args = [line, load, f"{snapshot:.6f}", limit, f"{lease:.3f}", 1, 3, online, "cd-test"]
    reply = redis.eval(CLAIM.text, len(keys.LEDGER) + len(queues), *keys.LEDGER, *queues, *args)
    claims = [reply[i:i + 5] for i in range(6, len(reply), 5)]
    return {"budget": int(reply[0]), "online": int(reply[3]), "in_flight": int(reply[4]), "least": int(reply[5]),
            "claims": claims}


def settle(redis: Any, claimed: list[Any], action: str = "ack") -> list[bytes]:
    names: list[Any] = list(keys.LEDGER)
    args: list[Any] = []
    record = json.dumps({"reason": "", "attempts": 0, "failed_at": 0})
    for queue, member, _, _, token in claimed:
        names += [queue, keys.deadletter_key(1)]
        args += [member, token, action, "0.000", 3, record]
    return list(redis.eval(SETTLE.text, len(names), *names, *args))


def claim_time(claimed: list[Any]) -> float:
    return float(claimed[-1][4].rsplit(b"|", 1)[1])


@pytest.fixture
def queued(redis: Any) -> Any:
    redis.zadd(QUEUE, {f'{{"url":"https://example.com/{i}","dimension_id":1}}': 1 for i in range(200)})
    return redis


def test_a_snapshot_that_misses_requests_on_their_way_does_not_enlarge_the_budget(queued: Any) -> None:
    """The failure seen on a loaded machine, step by step.

    Online traffic holds 40 of 100 tabs: recache may use 30. 18 are claimed; the next registry write
    comes before any of them reached the gateway (load still 40). Read alone, that snapshot says online
    traffic is 40 - 18 = 22 and the budget 30 more; the estimate carried from the first claim says 12.
    """
    redis = queued
    first = claim(redis, load=40, snapshot=redis_now(redis) - 0.5, online=-1, limit=18)
    assert (first["budget"], first["online"], len(first["claims"])) == (30, 40, 18)
    later = claim_time(first["claims"]) + 0.000001  # written after every claim, showing none of them
    second = claim(redis, load=40, snapshot=later, online=first["online"])
    assert (second["budget"], second["online"], second["least"], len(second["claims"])) == (12, 40, 22, 12)
    # Once they all render, the same estimate stands and nothing more is allowed.
    third = claim(redis, load=70, snapshot=claim_time(second["claims"]) + 0.000001, online=second["online"])
    assert (third["budget"], third["online"], third["claims"]) == (0, 40, [])


def test_without_an_estimate_the_whole_load_counts_as_online(queued: Any) -> None:
    redis = queued
    first = claim(redis, load=40, snapshot=redis_now(redis) - 0.5, online=-1, limit=10)
    later = claim_time(first["claims"]) + 0.000001
    # A daemon that just started sees 10 claims (another daemon's) it cannot place: all of the 50 may be online.
    assert claim(redis, load=50, snapshot=later, online=-1, limit=0)["online"] == 50


def test_the_estimate_rises_at_once_and_falls_as_far_as_a_snapshot_proves(queued: Any) -> None:
    redis = queued
    first = claim(redis, load=40, snapshot=redis_now(redis) - 0.5, online=-1, limit=10)
    later = claim_time(first["claims"]) + 0.000001
    # Online traffic rose by 10: 60 with the 10 claims rendering is at least 50 online.
    assert claim(redis, load=60, snapshot=later, online=40, limit=0)["online"] == 50
    # Online traffic fell: a load of 35 cannot mean more than 35 online, whatever was estimated.
    assert claim(redis, load=35, snapshot=later, online=50, limit=0)["online"] == 35
    settle(redis, first["claims"])
    # Nothing in flight: the snapshot is exact, and the budget grows with what online traffic left.
    fell = claim(redis, load=20, snapshot=redis_now(redis), online=40, limit=0)
    assert (fell["online"], fell["budget"]) == (20, 50)


def test_claims_that_ended_after_the_snapshot_count_as_shown_by_it(queued: Any) -> None:
    """A snapshot taken while 10 requests rendered, read after 5 of them were answered, still means 40 online."""
    redis = queued
    first = claim(redis, load=40, snapshot=redis_now(redis) - 0.5, online=-1, limit=10)
    snapshot = claim_time(first["claims"]) + 0.000001  # all 10 rendering: load 50
    assert settle(redis, first["claims"][:5]) == [b"ack"] * 5
    answer = claim(redis, load=50, snapshot=snapshot, online=40, limit=0)
    assert (answer["online"], answer["least"], answer["in_flight"], answer["budget"]) == (40, 40, 5, 25)
    assert 0 < redis.ttl(keys.ENDED) <= 10  # kept only as long as a snapshot can be that old


def test_a_reaped_claim_counts_as_shown_by_earlier_snapshots_too(queued: Any) -> None:
    redis = queued
    first = claim(redis, load=40, snapshot=redis_now(redis) - 0.5, online=-1, limit=3, lease=0.0)
    snapshot = claim_time(first["claims"]) + 0.000001  # the dead daemon's 3 requests rendering: load 43
    assert redis.eval(REAP.text, len(keys.LEDGER), *keys.LEDGER, 500) == 3
    answer = claim(redis, load=43, snapshot=snapshot, online=40, limit=0)
    assert (answer["online"], answer["in_flight"]) == (40, 0)
    assert redis.zcard(QUEUE) == 200  # every entry back in its queue


def test_status_budget_uses_the_least_online_load_the_snapshot_can_mean(queued: Any) -> None:
    """``Ledger.budget`` (for /status) passes 0 for the estimate: the snapshot alone, as before."""
    redis = queued
    first = claim(redis, load=40, snapshot=redis_now(redis) - 0.5, online=-1, limit=18)
    later = claim_time(first["claims"]) + 0.000001
    reply = redis.eval(CLAIM.text, len(keys.LEDGER), *keys.LEDGER,
                       LINE, 40, f"{later:.6f}", 0, "60.000", 0, 0, 0, "cd-test")
    assert (int(reply[0]), int(reply[3]), int(reply[4]), int(reply[5])) == (30, 22, 18, 22)
