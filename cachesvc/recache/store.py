"""The Redis data model shared with EdgeComet's Go components: keys, and the few scripts over them.

Scripts keep each round trip short: enqueueing checks the high-queue cap and adds in one step, and
every scan touches at most a few thousand keys per call, so Redis is never blocked for long
(unlike the Go daemon's 100,000-key Lua loops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks

from cachesvc.recache.redisclient import RedisClient

PRIORITIES = ("high", "normal", "autorecache")
SCAN_COUNT = 500
SCAN_ROUNDS = 4  # per invalidate-all script call: at most 2,000 keys
DELETE_CHUNK = 1000


def queue_key(host_id: int, priority: str) -> str:
    return f"recache:{host_id}:{priority}"


def meta_key(host_id: int, dimension_id: int, url_hash: str) -> str:
    return f"meta:cache:{host_id}:{dimension_id}:{url_hash}"


def deadletter_key(host_id: int) -> str:
    """cachesvc's own: entries that will not be retried, field = queue key + "\\n" + member."""
    return f"cachesvc:deadletter:{host_id}"


ENQUEUE = b"""
local limit = tonumber(ARGV[1])
if limit > 0 then
  local count = redis.call('ZCARD', KEYS[1])
  local new, seen = 0, {}
  for i = 3, #ARGV do
    local m = ARGV[i]
    if not seen[m] then
      seen[m] = true
      if not redis.call('ZSCORE', KEYS[1], m) then new = new + 1 end
    end
  end
  if count + new > limit then return {0, limit - count, new} end
end
for i = 3, #ARGV, 500 do
  local args = {}
  for j = i, math.min(i + 499, #ARGV) do
    args[#args + 1] = ARGV[2]
    args[#args + 1] = ARGV[j]
  end
  redis.call('ZADD', KEYS[1], unpack(args))
end
return {1, #ARGV - 2, 0}
"""

DELETE_EACH = b"""
local out = {}
for i = 1, #KEYS do out[i] = redis.call('DEL', KEYS[i]) end
return out
"""

DELETE_MATCHING = b"""
local cursor, deleted, filter = ARGV[1], 0, nil
if #ARGV >= 5 then
  filter = {}
  for i = 5, #ARGV do filter[ARGV[i]] = true end
end
for round = 1, tonumber(ARGV[4]) do
  local res = redis.call('SCAN', cursor, 'MATCH', ARGV[2], 'COUNT', ARGV[3])
  cursor = res[1]
  for _, key in ipairs(res[2]) do
    local keep = false
    if filter then
      local dim = string.match(key, '^meta:cache:[^:]*:([^:]*):')
      keep = not (dim and filter[dim])
    end
    if not keep then deleted = deleted + redis.call('DEL', key) end
  end
  if cursor == '0' then break end
end
return {cursor, deleted}
"""

SCAN_HASHES = b"""
local res = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local out = {res[1]}
for _, key in ipairs(res[2]) do
  local h = redis.pcall('HGETALL', key)
  if type(h) ~= 'table' or h['err'] then h = {} end
  out[#out + 1] = key
  out[#out + 1] = h
end
return out
"""

REQUEUE_DEAD = b"""
local t = redis.call('TIME')
local fields = redis.call('HKEYS', KEYS[1])
for _, id in ipairs(fields) do
  local nl = string.find(id, '\\n', 1, true)
  redis.call('ZADD', string.sub(id, 1, nl - 1), 'NX', t[1], string.sub(id, nl + 1))
  redis.call('HDEL', KEYS[1], id)
end
return #fields
"""


HASH_LENGTHS = b"""
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HLEN', KEYS[i]) end
return out
"""

INFLIGHT_SUMMARY = b"""
local t = redis.call('TIME')
local ids = redis.call('ZRANGE', 'cachesvc:inflight', 0, -1)
local unreflected = redis.call('ZCOUNT', 'cachesvc:inflight:started', '(' .. ARGV[1], '+inf')
local prefix = ARGV[2]
local mine = 0
for _, id in ipairs(ids) do
  if prefix ~= '' and string.sub(id, 1, #prefix) == prefix then mine = mine + 1 end
end
return {#ids, unreflected, mine}
"""

QUEUE_COUNTS = b"""
local out = {}
for i = 1, #KEYS do
  out[#out + 1] = redis.call('ZCARD', KEYS[i])
  out[#out + 1] = redis.call('ZCOUNT', KEYS[i], '-inf', ARGV[1])
end
return out
"""


@dataclass(frozen=True)
class Enqueued:
    ok: bool
    added: int  # members written (updates of existing members included), when ok
    free: int  # room left under the cap, when refused


@dataclass(frozen=True)
class QueueCount:
    total: int
    due_now: int


class Store:
    """Queue and metadata operations; every call is one bounded round trip (or a few)."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis

    @inlineCallbacks
    def enqueue(self, host_id: int, priority: str, members: Sequence[bytes], score: int, limit: int):  # type: ignore[no-untyped-def]
        if not members:
            return Enqueued(True, 0, 0)
        ok, count, _new = yield self.redis.eval(ENQUEUE, [queue_key(host_id, priority)], [limit, score, *members])
        return Enqueued(bool(int(ok)), int(count) if int(ok) else 0, 0 if int(ok) else int(count))

    @inlineCallbacks
    def delete_each(self, keys: Sequence[str]):  # type: ignore[no-untyped-def]
        """DEL every key; fires with one 0/1 per key."""
        results: list[int] = []
        for start in range(0, len(keys), DELETE_CHUNK):
            chunk = list(keys[start : start + DELETE_CHUNK])
            reply = yield self.redis.eval(DELETE_EACH, chunk, [])
            results += [int(n) for n in reply]
        return results

    @inlineCallbacks
    def delete_matching(self, pattern: str, dimension_ids: Sequence[int] | None):  # type: ignore[no-untyped-def]
        """Delete every key matching *pattern* (optionally only these dimensions); fires with the count."""
        cursor, total = b"0", 0
        filters = [str(d) for d in dimension_ids] if dimension_ids else []
        while True:
            cursor, deleted = yield self.redis.eval(DELETE_MATCHING, [], [cursor, pattern, SCAN_COUNT, SCAN_ROUNDS, *filters])
            total += int(deleted)
            if cursor in (b"0", "0"):
                return total

    @inlineCallbacks
    def scan_hashes(self, cursor: bytes, pattern: str, count: int = SCAN_COUNT):  # type: ignore[no-untyped-def]
        """One SCAN step with each key's hash: ``(next_cursor, [(key, {field: value})])``."""
        reply = yield self.redis.eval(SCAN_HASHES, [], [cursor, pattern, count])
        entries = []
        for i in range(1, len(reply), 2):
            flat = reply[i + 1]
            entries.append((reply[i], {flat[j]: flat[j + 1] for j in range(0, len(flat), 2)}))
        return reply[0], entries

    @inlineCallbacks
    def queue_counts(self, host_ids: Sequence[int], now: int):  # type: ignore[no-untyped-def]
        """``{host_id: {priority: QueueCount}}`` for every host, in one round trip."""
        keys = [queue_key(h, p) for h in host_ids for p in PRIORITIES]
        if not keys:
            return {}
        flat = yield self.redis.eval(QUEUE_COUNTS, keys, [now])
        counts: dict[int, dict[str, QueueCount]] = {}
        i = 0
        for h in host_ids:
            for p in PRIORITIES:
                counts.setdefault(h, {})[p] = QueueCount(int(flat[i]), int(flat[i + 1]))
                i += 2
        return counts

    def queue_entries(self, host_id: int, priority: str) -> Deferred[Any]:
        return self.redis.call("ZRANGE", queue_key(host_id, priority), 0, -1, "WITHSCORES")

    @inlineCallbacks
    def scan_keys(self, pattern: str):  # type: ignore[no-untyped-def]
        """Every key matching *pattern*, by SCAN (never KEYS), sorted."""
        cursor, keys = b"0", []
        while True:
            cursor, batch = yield self.redis.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            keys += batch
            if cursor in (b"0", "0", 0):
                return sorted(keys)

    @inlineCallbacks
    def scan_values(self, pattern: str):  # type: ignore[no-untyped-def]
        """Values of every string key matching *pattern* (registries: a handful of keys)."""
        keys = yield self.scan_keys(pattern)
        if not keys:
            return []
        values = yield self.redis.call("MGET", *keys)
        return [v for v in values if v]

    @inlineCallbacks
    def hash_lengths(self, keys: Sequence[str]):  # type: ignore[no-untyped-def]
        if not keys:
            return []
        reply = yield self.redis.eval(HASH_LENGTHS, list(keys), [])
        return [int(n) for n in reply]

    @inlineCallbacks
    def inflight_summary(self, snapshot: float, prefix: str = ""):  # type: ignore[no-untyped-def]
        """(entries in flight for all daemons, of those claimed after *snapshot*, of those with *prefix*)."""
        total, unreflected, mine = yield self.redis.eval(INFLIGHT_SUMMARY, [], [f"{snapshot:.6f}", prefix])
        return int(total), int(unreflected), int(mine)

    @inlineCallbacks
    def requeue_dead(self, host_id: int):  # type: ignore[no-untyped-def]
        """Put every dead-lettered entry of *host_id* back in its queue, due now; fires with the count."""
        count = yield self.redis.eval(REQUEUE_DEAD, [deadletter_key(host_id)], [])
        return int(count)
