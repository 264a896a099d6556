"""Claiming queue entries durably: the ledger that lets several daemons share one Redis safely.

An entry leaves its queue only inside the claim script, which records it as in flight with a lease
in the same step; it leaves Redis for good only when an Edge Gateway answered 200 (ack) or when it
is dead-lettered. If a daemon dies, any daemon's reaper returns its expired leases to their queues
with the original member bytes and score. The claim script also enforces the render budget for
all daemons together: the capacity line, minus the load online traffic causes, minus every claim
in flight, by any daemon.

The online load is the caller's estimate, which each snapshot raises to the least online traffic
it allows and lowers to the most (:meth:`Ledger.claim`; why, in :mod:`cachesvc.recache.online`).

The claim script is the one place the budget is computed; :meth:`Ledger.budget` asks it without
claiming, for ``/status``. Its keys are listed in :mod:`cachesvc.recache.keys`.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure

from cachesvc.recache import keys
from cachesvc.recache.redisclient import RedisClient, Script

CLAIM = Script("claim")
SETTLE = Script("settle")
REAP = Script("reap")


@dataclass(frozen=True)
class Claim:
    queue: bytes
    member: bytes
    score: bytes
    attempts: int
    token: bytes

    @property
    def id(self) -> bytes:
        return self.queue + b"\n" + self.member

    @property
    def host_id(self) -> int:
        return int(self.queue.split(b":")[1])

    @property
    def priority(self) -> str:
        return self.queue.split(b":")[2].decode()


@dataclass(frozen=True)
class Budget:
    """The render budget as the claim script computes it, for every daemon together."""

    budget: int  # what the capacity line allows beyond the load and every claim in flight
    unreflected: int  # claims made after the load snapshot, which the load cannot show yet
    online: int  # the online load the budget was computed with (see Ledger.claim)
    in_flight: int  # claims in flight, by every daemon
    least_online: int = 0  # the least online load the snapshot allows: its load less every claim it could show


@dataclass(frozen=True)
class ClaimResult:
    budget: Budget  # as it stood before this claim
    more_normal: bool  # due normal/autorecache work is still waiting
    claims: list[Claim]


class Ledger:
    """The claim/settle/reap scripts, one round trip each."""

    def __init__(self, redis: RedisClient, daemon_id: str, lease: float, reactor: Any) -> None:
        self.redis = redis
        self._reactor = reactor
        self._pending: list[tuple[Claim, list[Any], Deferred[str]]] = []
        self.daemon_id = daemon_id.replace("|", "_")
        self.lease = lease

    @inlineCallbacks
    def claim(
        self,
        line: int,
        load: int,
        snapshot: float,
        online: int | None,
        limit: int,
        host_ids: Sequence[int],
        classes: int,
    ) -> Generator[Deferred[Any], Any, ClaimResult]:
        """Claim due entries within the budget: line - the online load - every claim in flight.

        The online load is *online*, the estimate the last claim answered with (``budget.online``),
        raised to the least this snapshot can mean (*load* less every claim it could show) and
        lowered to the most (*load*); with no estimate yet (None), *load*. So it rises as soon as a
        snapshot shows more, and falls only when one proves less, however long claimed requests
        take to reach their gateways. *classes* says how many priorities to consider (1: high
        only; 3: all); hosts are visited in the order given, one entry each in turn.
        """
        queues = [keys.queue_key(h, p) for p in keys.PRIORITIES for h in host_ids]
        estimate = -1 if online is None else max(0, online)
        args = [line, load, f"{snapshot:.6f}", limit, f"{self.lease:.3f}", len(host_ids), classes, estimate]
        reply = yield self.redis.run(CLAIM, [*keys.LEDGER, *queues], [*args, self.daemon_id])
        claims = [
            Claim(reply[i], reply[i + 1], reply[i + 2], int(reply[i + 3]), reply[i + 4])
            for i in range(6, len(reply), 5)
        ]
        return ClaimResult(_budget(reply), bool(int(reply[2])), claims)

    @inlineCallbacks
    def budget(self, line: int, load: int, snapshot: float) -> Generator[Deferred[Any], Any, Budget]:
        """The budget this snapshot allows with the least online load it can mean (the claim script, no claim)."""
        args = [line, load, f"{snapshot:.6f}", 0, f"{self.lease:.3f}", 0, 0, 0, self.daemon_id]
        reply = yield self.redis.run(CLAIM, list(keys.LEDGER), args)
        return _budget(reply)

    def settle(
        self,
        claim: Claim,
        action: str,
        delay: float = 0.0,
        max_retries: int = 1,
        reason: str = "",
        failed_at: int = 0,
    ) -> Deferred[str]:
        """End a claim: ``ack``, ``retry`` (dead-letters once attempts reach *max_retries*), ``dead``, ``release``.

        Settles asked for in the same reactor turn travel in one script call: a burst of answers
        costs one round trip, not one each.
        """
        record = json.dumps({"reason": reason, "attempts": 0, "failed_at": failed_at}, separators=(",", ":"))
        d: Deferred[str] = Deferred()
        self._pending.append((claim, [claim.member, claim.token, action, f"{delay:.3f}", max_retries, record], d))
        if len(self._pending) == 1:
            self._reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        names: list[Any] = list(keys.LEDGER)
        for claim, _, _ in batch:
            names += [claim.queue, keys.deadletter_key(claim.host_id)]
        sent = self.redis.run(SETTLE, names, [a for _, group, _ in batch for a in group])

        def fan_out(results: Any) -> None:
            for (_, _, d), result in zip(batch, results, strict=True):
                d.callback(result.decode() if isinstance(result, bytes) else result)

        def fail_all(failure: Failure) -> None:
            for _, _, d in batch:
                d.errback(failure)

        sent.addCallbacks(fan_out, fail_all)

    def reap(self, batch: int = 500) -> Deferred[Any]:
        """Return at most *batch* entries whose lease expired to their queues; fires with how many."""
        return self.redis.run(REAP, list(keys.LEDGER), [batch])


def _budget(reply: list[Any]) -> Budget:
    return Budget(budget=int(reply[0]), unreflected=int(reply[1]), online=int(reply[3]), in_flight=int(reply[4]),
                  least_online=int(reply[5]))
