"""Queue, metadata and registry operations on the Redis data model shared with EdgeComet's Go components.

Every call is one bounded round trip (or a few): enqueueing checks the high-queue cap and adds in
one script, listings read only the page they return, and every scan touches at most a few
thousand keys per call, so Redis is never blocked for long (unlike the Go daemon's 100,000-key
Lua loops). Key names come from :mod:`cachesvc.recache.keys`.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks

from cachesvc.recache import keys
from cachesvc.recache.redisclient import RedisClient, Script

SCAN_COUNT = 500
SCAN_ROUNDS = 4  # per invalidate-all script call: at most 2,000 keys
DELETE_CHUNK = 1000
ENQUEUE_CHUNK = 1000
_REGISTRY_PREFIXES = tuple(p.encode() for p in keys.REGISTRY_PREFIXES)

ENQUEUE = Script("enqueue")
DELETE_EACH = Script("delete_each")
DELETE_MATCHING = Script("delete_matching")
SCAN_HASHES = Script("scan_hashes")
REQUEUE_DEAD = Script("requeue_dead")
HASH_LENGTHS = Script("hash_lengths")
INFLIGHT_SUMMARY = Script("inflight_summary")
QUEUE_COUNTS = Script("queue_counts")
QUEUE_PAGE = Script("queue_page")


@dataclass(frozen=True)
class Enqueued:
    ok: bool
    added: int  # members written (updates of existing members included), when ok
    free: int  # room left under the cap, when refused


@dataclass(frozen=True)
class QueueCount:
    total: int
    due_now: int


@dataclass(frozen=True)
class QueueEntry:
    priority: str
    member: bytes
    score: bytes


@dataclass(frozen=True)
class QueuePage:
    total: int  # entries in every listed queue together
    entries: list[QueueEntry]


@dataclass(frozen=True)
class InflightSummary:
    total: int  # entries in flight, for every daemon together
    unreflected: int  # of those, claimed after the snapshot
    matching: int  # of those, in the queues of the given host


def _done(cursor: Any) -> bool:
    return cursor in (b"0", "0", 0)


class Store:
    """The recache half's Redis operations other than the claim ledger's."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis

    def ping(self) -> Deferred[Any]:
        return self.redis.call("PING")

    @inlineCallbacks
    def enqueue(
        self, host_id: int, priority: str, members: Sequence[bytes], score: int, limit: int
    ) -> Generator[Deferred[Any], Any, Enqueued]:
        """Add *members* due at *score*, all or none under *limit* (0 = no cap); fires with :class:`Enqueued`."""
        if not members:
            return Enqueued(True, 0, 0)
        queue = [keys.queue_key(host_id, priority)]
        if limit:  # the cap is checked and applied in one step: one call
            ok, count, _new = yield self.redis.run(ENQUEUE, queue, [limit, score, *members])
            return Enqueued(bool(int(ok)), int(count) if int(ok) else 0, 0 if int(ok) else int(count))
        added = 0  # no cap: chunks, so that neither this reactor nor Redis is held by one big call
        for start in range(0, len(members), ENQUEUE_CHUNK):
            _ok, count, _new = yield self.redis.run(ENQUEUE, queue, [0, score, *members[start : start + ENQUEUE_CHUNK]])
            added += int(count)
        return Enqueued(True, added, 0)

    @inlineCallbacks
    def delete_each(self, names: Sequence[bytes | str]) -> Generator[Deferred[Any], Any, list[int]]:
        """DEL every key; fires with one 0/1 per key."""
        results: list[int] = []
        for start in range(0, len(names), DELETE_CHUNK):
            reply = yield self.redis.run(DELETE_EACH, list(names[start : start + DELETE_CHUNK]), [])
            results += [int(n) for n in reply]
        return results

    @inlineCallbacks
    def delete_metadata(self, host_id: int, dimension_ids: Sequence[int] | None) -> Generator[Deferred[Any], Any, int]:
        """Delete every metadata key of *host_id* (optionally only these dimensions); fires with the count."""
        cursor, total = b"0", 0
        filters = [str(d) for d in dimension_ids] if dimension_ids else []
        prefix = keys.meta_pattern(host_id)[:-1]
        while True:
            cursor, deleted = yield self.redis.run(
                DELETE_MATCHING, [], [cursor, prefix, SCAN_COUNT, SCAN_ROUNDS, *filters]
            )
            total += int(deleted)
            if _done(cursor):
                return total

    @inlineCallbacks
    def scan_metadata(
        self, host_id: int, cursor: bytes, count: int = SCAN_COUNT
    ) -> Generator[Deferred[Any], Any, tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]:
        """One SCAN step over *host_id*'s metadata, with each hash: ``(next_cursor, [(key, {field: value})])``."""
        reply = yield self.redis.run(SCAN_HASHES, [], [cursor, keys.meta_pattern(host_id), count])
        entries = []
        for i in range(1, len(reply), 2):
            flat = reply[i + 1]
            entries.append((reply[i], {flat[j]: flat[j + 1] for j in range(0, len(flat), 2)}))
        return reply[0], entries

    @inlineCallbacks
    def queue_counts(
        self, host_ids: Sequence[int], now: int
    ) -> Generator[Deferred[Any], Any, dict[int, dict[str, QueueCount]]]:
        """``{host_id: {priority: QueueCount}}`` for every host, in one round trip."""
        names = [keys.queue_key(h, p) for h in host_ids for p in keys.PRIORITIES]
        if not names:
            return {}
        flat = yield self.redis.run(QUEUE_COUNTS, names, [now])
        counts: dict[int, dict[str, QueueCount]] = {}
        i = 0
        for h in host_ids:
            for p in keys.PRIORITIES:
                counts.setdefault(h, {})[p] = QueueCount(int(flat[i]), int(flat[i + 1]))
                i += 2
        return counts

    @inlineCallbacks
    def queue_page(
        self, host_id: int, priorities: Sequence[str], offset: int, size: int
    ) -> Generator[Deferred[Any], Any, QueuePage]:
        """Entries *offset* to *offset + size* of *host_id*'s queues listed one after another; a :class:`QueuePage`."""
        reply = yield self.redis.run(QUEUE_PAGE, [keys.queue_key(host_id, p) for p in priorities], [offset, size])
        entries = [
            QueueEntry(priorities[int(reply[i]) - 1], reply[i + 1], reply[i + 2]) for i in range(1, len(reply), 3)
        ]
        return QueuePage(int(reply[0]), entries)

    # --- the registries (read by cachesvc.recache.discovery; never a whole-keyspace SCAN in one go) ---

    @inlineCallbacks
    def scan_registries(self, cursor: bytes, count: int) -> Generator[Deferred[Any], Any, tuple[bytes, list[bytes]]]:
        """One SCAN step of about *count* keys: ``(next cursor, registry keys among them)``; cursor ``0`` = done."""
        cursor, batch = yield self.redis.call("SCAN", cursor, "MATCH", keys.REGISTRY_MATCH, "COUNT", count)
        return cursor, [k for k in batch if k.startswith(_REGISTRY_PREFIXES)]

    @inlineCallbacks
    def read_keys(self, names: Sequence[bytes]) -> Generator[Deferred[Any], Any, list[bytes | None]]:
        """The values of string keys *names*, in order, None for a key that does not exist (one MGET)."""
        if not names:
            return []
        found: list[bytes | None] = yield self.redis.call("MGET", *names)
        return found

    @inlineCallbacks
    def key_count(self) -> Generator[Deferred[Any], Any, int]:
        """Keys in the database (DBSIZE, O(1)): what sizes the steps of a paced scan."""
        count = yield self.redis.call("DBSIZE")
        return int(count)

    @inlineCallbacks
    def notify_flags(self) -> Generator[Deferred[Any], Any, str]:
        """The server's ``notify-keyspace-events``; fails with RedisError where CONFIG is refused."""
        reply = yield self.redis.call("CONFIG", "GET", "notify-keyspace-events")
        value = reply[1] if len(reply) > 1 else b""
        return value.decode() if isinstance(value, bytes) else str(value)

    def set_notify_flags(self, flags: str) -> Deferred[Any]:
        return self.redis.call("CONFIG", "SET", "notify-keyspace-events", flags)

    def write_probe(self, name: str, ms: int) -> Deferred[Any]:
        """A short-lived key whose keyspace notification shows that notifications flow."""
        return self.redis.call("SET", name, "1", "PX", ms)

    @inlineCallbacks
    def deadletter_counts(self, host_ids: Sequence[int]) -> Generator[Deferred[Any], Any, dict[int, int]]:
        """``{host_id: entries in its dead-letter set}``, in one round trip."""
        if not host_ids:
            return {}
        reply = yield self.redis.run(HASH_LENGTHS, [keys.deadletter_key(h) for h in host_ids], [])
        return dict(zip(host_ids, (int(n) for n in reply), strict=True))

    @inlineCallbacks
    def deadletters(self, host_id: int) -> Generator[Deferred[Any], Any, list[tuple[bytes, bytes, bytes]]]:
        """``[(queue key, member, record JSON bytes)]`` of *host_id*'s dead-letter set."""
        flat = yield self.redis.call("HGETALL", keys.deadletter_key(host_id))
        found = []
        for i in range(0, len(flat), 2):
            queue, _, member = flat[i].partition(b"\n")
            found.append((queue, member, flat[i + 1]))
        return found

    @inlineCallbacks
    def inflight_summary(
        self, snapshot: float, host_id: int | None = None
    ) -> Generator[Deferred[Any], Any, InflightSummary]:
        """An :class:`InflightSummary`: in flight for every daemon, claimed after *snapshot*, and of *host_id*."""
        prefix = "" if host_id is None else keys.queue_prefix(host_id)
        total, unreflected, mine = yield self.redis.run(
            INFLIGHT_SUMMARY, [keys.INFLIGHT, keys.STARTED], [f"{snapshot:.6f}", prefix]
        )
        return InflightSummary(int(total), int(unreflected), int(mine))

    @inlineCallbacks
    def requeue_dead(self, host_id: int) -> Generator[Deferred[Any], Any, int]:
        """Put every dead-lettered entry of *host_id* back in its queue, due now; fires with the count."""
        count = yield self.redis.run(REQUEUE_DEAD, [keys.deadletter_key(host_id)], [])
        return int(count)
