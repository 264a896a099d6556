"""Claiming queue entries durably: the ledger that lets several daemons share one Redis safely.

An entry leaves its queue only inside the claim script, which records it as in flight with a lease
in the same step; it leaves Redis for good only when an Edge Gateway answered 200 (ack) or when it
is dead-lettered. If a daemon dies, any daemon's reaper returns its expired leases to their queues
with the original member bytes and score. The claim script also enforces the render budget for
all daemons together: the capacity line, minus the load online traffic causes (the reported load
less the claims it can already reflect), minus every claim in flight, by any daemon.

Keys (shared by every cachesvc daemon on the Redis; none collide with EdgeComet's):

``cachesvc:inflight``          ZSET  id -> lease expiry (Redis time)
``cachesvc:inflight:started``  ZSET  id -> claim time
``cachesvc:inflight:meta``     HASH  id -> "score|attempts|daemon|claimed_at"
``cachesvc:attempts``          HASH  id -> failed attempts so far (kept across retries)
``cachesvc:deadletter:{host}`` HASH  id -> JSON {reason, attempts, failed_at}

where id = queue key + "\\n" + member bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks

from cachesvc.recache.redisclient import RedisClient
from cachesvc.recache.store import PRIORITIES, queue_key

INFLIGHT = "cachesvc:inflight"
STARTED = "cachesvc:inflight:started"
META = "cachesvc:inflight:meta"
ATTEMPTS = "cachesvc:attempts"


CLAIM = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
-- ARGV[1] capacity line, ARGV[2] reported load, ARGV[3] snapshot time, ARGV[8] online-load floor
local claimed_total = redis.call('ZCARD', 'cachesvc:inflight:started')
local unreflected = redis.call('ZCOUNT', 'cachesvc:inflight:started', '(' .. ARGV[3], '+inf')
local online = math.max(0, tonumber(ARGV[2]) - (claimed_total - unreflected))
local budget = tonumber(ARGV[1]) - math.max(online, tonumber(ARGV[8])) - claimed_total
local n = math.min(budget, tonumber(ARGV[4]))
local hosts, classes = tonumber(ARGV[6]), tonumber(ARGV[7])
local claimed = {}
local stamp = string.format('%.6f', now)
for c = 0, classes - 1 do
  local active = {}
  for h = 1, hosts do active[h] = KEYS[c * hosts + h] end
  while n > 0 and #active > 0 do
    local still = {}
    for _, key in ipairs(active) do
      if n <= 0 then break end
      local e = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1)
      if #e > 0 then
        redis.call('ZREM', key, e[1])
        local id = key .. '\\n' .. e[1]
        local attempts = redis.call('HGET', 'cachesvc:attempts', id) or '0'
        local token = ARGV[9] .. '|' .. stamp
        redis.call('ZADD', 'cachesvc:inflight', now + tonumber(ARGV[5]), id)
        redis.call('ZADD', 'cachesvc:inflight:started', now, id)
        redis.call('HSET', 'cachesvc:inflight:meta', id, e[2] .. '|' .. attempts .. '|' .. token)
        claimed[#claimed + 1] = {key, e[1], e[2], attempts, token}
        n = n - 1
        still[#still + 1] = key
      end
    end
    active = still
  end
end
local more = 0
for i = hosts + 1, #KEYS do
  if redis.call('ZCOUNT', KEYS[i], '-inf', now) > 0 then more = 1 break end
end
local out = {budget, unreflected, more, online}
for _, e in ipairs(claimed) do
  for _, v in ipairs(e) do out[#out + 1] = v end
end
return out
"""

# ARGV: groups of (id, token, action, delay, max_retries, dead-letter record); action is
# ack | retry | dead | release. Returns one outcome per group: ack, retry, dead, release or gone.
SETTLE = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for g = 0, #ARGV / 6 - 1 do
  local id, token, action = ARGV[g * 6 + 1], ARGV[g * 6 + 2], ARGV[g * 6 + 3]
  local delay, max_retries, record = tonumber(ARGV[g * 6 + 4]), tonumber(ARGV[g * 6 + 5]), ARGV[g * 6 + 6]
  local meta = redis.call('HGET', 'cachesvc:inflight:meta', id)
  local result = 'gone'
  if meta and string.sub(meta, -#token) == token then
    local score = string.match(meta, '^([^|]*)|')
    redis.call('ZREM', 'cachesvc:inflight', id)
    redis.call('ZREM', 'cachesvc:inflight:started', id)
    redis.call('HDEL', 'cachesvc:inflight:meta', id)
    local nl = string.find(id, '\\n', 1, true)
    local key, member = string.sub(id, 1, nl - 1), string.sub(id, nl + 1)
    local host = string.match(key, '^recache:([^:]*):')
    if action == 'ack' then
      redis.call('HDEL', 'cachesvc:attempts', id)
      result = 'ack'
    elseif action == 'release' then
      redis.call('ZADD', key, 'LT', score, member)
      result = 'release'
    else
      local attempts = tonumber(redis.call('HGET', 'cachesvc:attempts', id) or '0') + 1
      if action == 'retry' and attempts < max_retries then
        redis.call('HSET', 'cachesvc:attempts', id, attempts)
        redis.call('ZADD', key, 'NX', string.format('%.3f', now + delay * (2 ^ (attempts - 1))), member)
        result = 'retry'
      else
        redis.call('HDEL', 'cachesvc:attempts', id)
        local filled = string.gsub(record, '"attempts":0', '"attempts":' .. attempts, 1)
        redis.call('HSET', 'cachesvc:deadletter:' .. host, id, filled)
        result = 'dead'
      end
    end
  end
  out[#out + 1] = result
end
return out
"""

REAP = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ids = redis.call('ZRANGEBYSCORE', 'cachesvc:inflight', '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  local meta = redis.call('HGET', 'cachesvc:inflight:meta', id)
  local nl = string.find(id, '\\n', 1, true)
  if meta and nl then
    local score = string.match(meta, '^([^|]*)|')
    redis.call('ZADD', string.sub(id, 1, nl - 1), 'LT', score, string.sub(id, nl + 1))
  end
  redis.call('ZREM', 'cachesvc:inflight', id)
  redis.call('ZREM', 'cachesvc:inflight:started', id)
  redis.call('HDEL', 'cachesvc:inflight:meta', id)
end
return #ids
"""

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
class ClaimResult:
    budget: int  # what the capacity line allowed before this claim, for all daemons together
    more_normal: bool  # due normal/autorecache work is still waiting
    online: int  # the load online traffic causes, as this snapshot shows it
    claims: list[Claim]


class Ledger:
    """The claim/settle/reap scripts, one round trip each."""

    def __init__(self, redis: RedisClient, daemon_id: str, lease: float, reactor: Any) -> None:
        self.redis = redis
        self._reactor = reactor
        self._pending: list[tuple[list[Any], Deferred[str]]] = []
        self.daemon_id = daemon_id.replace("|", "_")
        self.lease = lease

    @inlineCallbacks
    def claim(self, line: int, load: int, snapshot: float, online_floor: int, limit: int,  # type: ignore[no-untyped-def]
              host_ids: Sequence[int], classes: int):
        """Claim due entries within the budget: line - max(online load, *online_floor*) - every claim in flight."""
        keys = [queue_key(h, p) for p in PRIORITIES[:3] for h in host_ids]
        reply = yield self.redis.eval(
            CLAIM, keys,
            [line, load, f"{snapshot:.6f}", limit, f"{self.lease:.3f}", len(host_ids), classes, online_floor, self.daemon_id],
        )
        budget, more, online = int(reply[0]), bool(int(reply[2])), int(reply[3])
        claims = [
            Claim(reply[i], reply[i + 1], reply[i + 2], int(reply[i + 3]), reply[i + 4]) for i in range(4, len(reply), 5)
        ]
        return ClaimResult(budget, more, online, claims)

    def settle(self, claim: Claim, action: str, delay: float = 0.0, max_retries: int = 1, reason: str = "",
               failed_at: int = 0) -> Deferred[str]:
        """End a claim: ``ack``, ``retry`` (dead-letters once attempts reach *max_retries*), ``dead``, ``release``.

        Settles asked for in the same reactor turn travel in one script call: a burst of answers
        costs one round trip, not one each.
        """
        record = json.dumps({"reason": reason, "attempts": 0, "failed_at": failed_at}, separators=(",", ":"))
        d: Deferred[str] = Deferred()
        self._pending.append(([claim.id, claim.token, action, f"{delay:.3f}", max_retries, record], d))
        if len(self._pending) == 1:
            self._reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        args = [a for group, _ in batch for a in group]
        sent = self.redis.eval(SETTLE, [], args)

        def fan_out(results: Any) -> None:
            for (_, d), result in zip(batch, results):
                d.callback(result.decode() if isinstance(result, bytes) else result)

        def fail_all(failure: Any) -> None:
            for _, d in batch:
                d.errback(failure)

        sent.addCallbacks(fan_out, fail_all)

    def reap(self, batch: int = 500) -> Any:
        return self.redis.eval(REAP, [], [batch])
