"""The Cache Daemon endpoints: same paths, bodies, field order, messages and status codes as EdgeComet's.

Better than the Go daemon where it does not break clients: the high-priority queue is capped
(429, nothing enqueued), a Redis failure is 503 rather than a 200 with smaller counts, the cache
listing's cursor resumes exactly where a page ended, and scans are bounded batches.
"""

from __future__ import annotations

import json
from typing import Any, Generator

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.web.server import Request

from cachesvc.api.http import ApiError, ApiResource, Raw, envelope, make_site
from cachesvc.recache.edgeconfig import Host
from cachesvc.recache.gojson import GoJSONError, decode, encode_object
from cachesvc.recache.members import decode_member, encode_member
from cachesvc.recache.redisclient import RedisError
from cachesvc.recache.registry import Capacity, capacity_line, format_go_time, healthy_services
from cachesvc.recache.requests import INVALIDATE_ALL_REQUEST, INVALIDATE_REQUEST, RECACHE_REQUEST
from cachesvc.recache.settings import RecacheSettings
from cachesvc.recache.state import SchedulerState
from cachesvc.recache.store import PRIORITIES, Store, deadletter_key, meta_key
from cachesvc.recache.urlnorm import URLError, normalize, url_hash

MAX_URLS = 10000
ITEM_FIELDS = ("url", "title", "dimension", "status", "cache_age", "size", "disk_size", "last_access", "cache_key",
               "created_at", "expires_at", "status_code", "source", "index_status", "last_bot_hit")
STRING_FIELDS = {"url", "title", "dimension", "cache_key", "source"}


class CacheAPI:
    log = Logger()

    def __init__(self, settings: RecacheSettings, store: Store, state: SchedulerState, clock: Any, metrics: Any = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.edge = settings.edge
        self.store = store
        self.state = state
        self.clock = clock

    def resource(self, reactor: Any) -> ApiResource:
        routes = {
            (b"POST", b"/internal/cache/recache"): self.recache,
            (b"POST", b"/internal/cache/invalidate"): self.invalidate,
            (b"POST", b"/internal/cache/invalidate-all"): self.invalidate_all,
            (b"GET", b"/status"): self.status,
            (b"GET", b"/internal/cache/urls"): self.cache_urls,
            (b"GET", b"/internal/cache/summary"): self.cache_summary,
            (b"GET", b"/internal/cache/queue"): self.queue,
            (b"GET", b"/internal/cache/queue/summary"): self.queue_summary,
            (b"GET", b"/internal/cache/deadletter"): self.deadletter,
            (b"POST", b"/internal/cache/deadletter/requeue"): self.requeue_deadletter,
            (b"POST", b"/internal/scheduler/pause"): self.pause,
            (b"POST", b"/internal/scheduler/resume"): self.resume,
        }
        return ApiResource(self.edge.auth_key, routes, reactor, self.settings.request_timeout, self.healthz, self.metrics)

    def site(self, reactor: Any):  # type: ignore[no-untyped-def]
        return make_site(self.resource(reactor), self.settings.max_body_size, self.settings.request_timeout)

    # --- helpers ---------------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock.seconds())

    @staticmethod
    def _body(request: Request, spec: Any) -> dict[str, Any]:
        try:
            return decode(request.content.read(), spec)
        except GoJSONError as e:
            raise ApiError(400, f"invalid json: {e}") from None

    def _host(self, host_id: int, status: int = 400) -> Host:
        host = self.edge.host(host_id)
        if host is None:
            raise ApiError(status, f"host_id {host_id} not found")
        return host

    @staticmethod
    def _dimensions(host: Host, requested: list[int] | None) -> list[int]:
        allowed = host.recache_dimension_ids
        if not requested:
            return allowed
        for dim in requested:
            if dim not in allowed:
                raise ApiError(400, f"dimension_id {dim} not configured for host '{host.domain}'")
        return list(requested)

    def _normalized(self, urls: list[str], host_id: int) -> list[str]:
        out = []
        for url in urls:
            try:
                out.append(normalize(url))
            except URLError as e:
                self.log.error("Invalid URL, skipping url={url!r} host_id={host_id} error={error}", url=url, host_id=host_id, error=str(e))
        return out

    # --- write endpoints -------------------------------------------------------------------------

    @inlineCallbacks
    def recache(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        body = self._body(request, RECACHE_REQUEST)
        host_id, urls, priority = body["host_id"], body["urls"] or [], body["priority"]
        if host_id == 0:
            raise ApiError(400, "host_id is required")
        if not urls:
            raise ApiError(400, "urls array cannot be empty")
        if len(urls) > MAX_URLS:
            raise ApiError(400, f"urls array cannot exceed {MAX_URLS} entries")
        if priority not in ("high", "normal"):
            raise ApiError(400, "priority must be 'high' or 'normal'")
        host = self._host(host_id)
        dims = self._dimensions(host, body["dimension_ids"])
        members = [encode_member(url, dim) for url in self._normalized(urls, host_id) for dim in dims]
        limit = self.settings.high_queue_limit if priority == "high" else 0
        result = yield self.store.enqueue(host_id, priority, members, self._now(), limit)
        if not result.ok:
            raise ApiError(
                429,
                f"high priority queue for host {host_id} is full: {max(0, result.free)} of {limit} entries free, "
                f"this request needs more; nothing was enqueued",
            )
        self.log.info("Recache request processed host_id={host_id} priority={priority} urls={urls} entries={entries}",
                      host_id=host_id, priority=priority, urls=len(urls), entries=result.added)
        return envelope(True, data={"host_id": host_id, "urls_count": len(urls), "dimension_ids_count": len(dims),
                                    "entries_enqueued": result.added, "priority": priority})

    @inlineCallbacks
    def invalidate(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        body = self._body(request, INVALIDATE_REQUEST)
        host_id, urls = body["host_id"], body["urls"] or []
        if host_id == 0:
            raise ApiError(400, "host_id is required")
        if not urls:
            raise ApiError(400, "urls array cannot be empty")
        host = self._host(host_id)
        dims = self._dimensions(host, body["dimension_ids"])
        normalized = self._normalized(urls, host_id)
        keys = [meta_key(host_id, dim, url_hash(url)) for url in normalized for dim in dims]
        deleted = yield self.store.delete_each(keys)
        for i, url in enumerate(normalized):
            if not any(deleted[i * len(dims) : (i + 1) * len(dims)]):
                self.log.warn("No cache metadata found for URL during invalidation url={url!r} host_id={host_id}", url=url, host_id=host_id)
        self.log.info("Invalidate request processed host_id={host_id} urls={urls} entries={entries}",
                      host_id=host_id, urls=len(urls), entries=sum(deleted))
        return envelope(True, data={"host_id": host_id, "urls_count": len(urls), "dimension_ids_count": len(dims),
                                    "entries_invalidated": sum(deleted)})

    @inlineCallbacks
    def invalidate_all(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        body = self._body(request, INVALIDATE_ALL_REQUEST)
        host_id = body["host_id"]
        if host_id == 0:
            raise ApiError(400, "host_id is required")
        host = self._host(host_id)
        dims = self._dimensions(host, body["dimension_ids"])
        try:
            deleted = yield self.store.delete_matching(f"meta:cache:{host_id}:*", body["dimension_ids"] or None)
        except RedisError as e:
            self.log.error("invalidate-all failed host_id={host_id}: {e}", host_id=host_id, e=e)
            raise ApiError(500, "internal error during invalidation") from None
        self.log.info("Invalidate-all request processed host_id={host_id} entries={entries}", host_id=host_id, entries=deleted)
        return envelope(True, data={"host_id": host_id, "dimension_ids_count": len(dims), "entries_invalidated": deleted})

    # --- status and control ----------------------------------------------------------------------

    @inlineCallbacks
    def status(self, request: Request) -> Generator[Deferred[Any], Any, Raw]:
        now = self.clock.seconds()
        values = yield self.store.scan_values("service:render:*")
        services = healthy_services(values, now)
        capacity = Capacity.of(services, self.settings.rs_capacity_reserved)
        snapshot = min((s.last_seen for s in services), default=now)
        in_flight, unreflected, _ = yield self.store.inflight_summary(snapshot)
        line = capacity_line(services, self.settings.rs_capacity_reserved)
        budget = max(0, line - sum(s.load for s in services) - unreflected)
        host_ids = [h.id for h in self.edge.hosts]
        counts = yield self.store.queue_counts(host_ids, int(now))
        dead = yield self.store.hash_lengths([deadletter_key(h) for h in host_ids])
        dead_by_host = dict(zip(host_ids, dead))
        size, max_size = self.state.size, self.state.max_size
        queues = {
            str(h): {**{p: {"total": counts[h][p].total, "due_now": counts[h][p].due_now} for p in PRIORITIES},
                     "dead_letter": dead_by_host[h]}
            for h in sorted(host_ids, key=str)
        }
        body = encode_object([
            ("daemon", {"daemon_id": self.settings.daemon_id, "uptime_seconds": int(now - self.state.started_at),
                        "last_tick": format_go_time(self.state.last_tick)}),
            ("internal_queue", {"size": size, "max_size": max_size,
                                "capacity_used_percent": float(size) / max_size * 100 if max_size else 0.0}),
            ("rs_capacity", {"total_free_tabs": capacity.total_free, "reserved_for_online": capacity.reserved,
                             "available_for_recache": capacity.available,
                             "reservation_percent": capacity.reservation * 100,
                             "capacity_line": line, "recache_budget": budget, "in_flight": in_flight}),
            ("queues", queues),
        ])
        return Raw(body)

    def pause(self, request: Request) -> bytes:
        return self._control(True)

    def resume(self, request: Request) -> bytes:
        return self._control(False)

    def _control(self, paused: bool) -> bytes:
        if not self.settings.scheduler_control_api:
            raise ApiError(403, "Scheduler control API not enabled")
        self.state.paused = paused
        message = "Scheduler paused" if paused else "Scheduler resumed"
        self.log.info(message)
        return envelope(True, message)

    @inlineCallbacks
    def healthz(self, request: Request) -> Generator[Deferred[Any], Any, tuple[int, bytes]]:
        try:
            yield self.store.redis.call("PING")
        except Exception as e:
            return 503, envelope(False, f"redis unavailable: {e}")
        return 200, envelope(True)

    # --- read endpoints --------------------------------------------------------------------------

    def _query_host(self, request: Request) -> Host:
        raw = _arg(request, "host_id")
        if raw is None or raw == "":
            raise ApiError(400, "host_id is required")
        try:
            host_id = int(raw)
        except ValueError:
            raise ApiError(400, "host_id must be a valid integer") from None
        if host_id <= 0:
            raise ApiError(400, "host_id is required")
        return self._host(host_id, status=404)

    @inlineCallbacks
    def cache_urls(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        host = self._query_host(request)
        limit = _limit(request)
        filters = _CacheFilters.parse(request, host)
        scan_cursor, skip = _split_cursor(_arg(request, "cursor") or "0")
        now = self._now()
        items: list[dict[str, Any]] = []
        next_cursor = "0"
        pattern = f"meta:cache:{host.id}:*"
        for _ in range(200):  # bounded, as Go's 200 SCAN iterations per call
            following, entries = yield self.store.scan_hashes(scan_cursor, pattern)
            entries.sort(key=lambda e: e[0])
            following = following.decode() if isinstance(following, bytes) else str(following)
            for index, (_, fields) in enumerate(entries[skip:], start=skip):
                item = _item(fields, now, host.stale_ttl)
                if filters.match(item, fields, now):
                    items.append(item)
                    if len(items) == limit:
                        rest = entries[index + 1 :]
                        if rest:
                            next_cursor = f"{scan_cursor.decode()}-{index + 1}"
                        else:
                            next_cursor = following
                        break
            else:
                skip = 0
                scan_cursor = following.encode()
                if following == "0":
                    next_cursor = "0"
                    break
                next_cursor = following
                continue
            break
        return envelope(True, data={"items": [_ordered(i) for i in items], "cursor": next_cursor,
                                    "has_more": next_cursor != "0"})

    @inlineCallbacks
    def cache_summary(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        host = self._query_host(request)
        now = self._now()
        totals = {"active": 0, "stale": 0, "expired": 0}
        size = 0
        by_dimension: dict[str, int] = {}
        by_source: dict[str, int] = {}
        cursor = b"0"
        while True:
            cursor, entries = yield self.store.scan_hashes(cursor, f"meta:cache:{host.id}:*", 1000)
            for _, fields in entries:
                item = _item(fields, now, host.stale_ttl)
                totals[item["status"]] += 1
                size += item["size"]
                dim = _text(fields.get(b"dimension")) or "unknown"
                src = _text(fields.get(b"source")) or "unknown"
                by_dimension[dim] = by_dimension.get(dim, 0) + 1
                by_source[src] = by_source.get(src, 0) + 1
            if cursor in (b"0", "0"):
                break
        return envelope(True, data={
            "total_urls": sum(totals.values()), "active_count": totals["active"], "stale_count": totals["stale"],
            "expired_count": totals["expired"], "total_size": size,
            "by_dimension": dict(sorted(by_dimension.items())), "by_source": dict(sorted(by_source.items())),
        })

    @inlineCallbacks
    def queue(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        host = self._query_host(request)
        _limit(request)  # checked before the priority filter, as in Go
        priorities = list(PRIORITIES)
        raw = _arg(request, "priority")
        if raw:
            priorities = [p.strip() for p in raw.split(",")]
            for p in priorities:
                if p not in PRIORITIES:
                    raise ApiError(400, f"invalid priority filter: {p}")
        names = {d.id: d.name for d in host.dimensions}
        items = []
        for priority in priorities:
            flat = yield self.store.queue_entries(host.id, priority)
            for i in range(0, len(flat), 2):
                try:
                    member = decode_member(flat[i])
                except GoJSONError:
                    self.log.warn("skipping malformed queue member {member!r}", member=flat[i])
                    continue
                items.append({"url": member.url, "dimension": names.get(member.dimension_id, "unknown"),
                              "priority": priority, "scheduled_at": int(float(flat[i + 1]))})
        return envelope(True, data=_offset_page(request, items))

    @inlineCallbacks
    def queue_summary(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        host = self._query_host(request)
        counts = yield self.store.queue_counts([host.id], self._now())
        pending = sum(c.total for c in counts[host.id].values())
        _, _, processing = yield self.store.inflight_summary(self.clock.seconds(), f"recache:{host.id}:")
        return envelope(True, data={"pending": pending, "processing": processing})

    @inlineCallbacks
    def deadletter(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        """Entries that will not be retried: rejected by a gateway, out of attempts, or undecodable."""
        host = self._query_host(request)
        flat = yield self.store.redis.call("HGETALL", deadletter_key(host.id))
        names = {d.id: d.name for d in host.dimensions}
        items = []
        for i in range(0, len(flat), 2):
            queue, _, member = flat[i].partition(b"\n")
            record = json.loads(flat[i + 1])
            try:
                decoded = decode_member(member)
                url, dimension = decoded.url, names.get(decoded.dimension_id, "unknown")
            except GoJSONError:
                url, dimension = member.decode("utf-8", "replace"), "unknown"
            items.append({"url": url, "dimension": dimension, "priority": queue.decode().rsplit(":", 1)[-1],
                          "reason": record.get("reason", ""), "attempts": record.get("attempts", 0),
                          "failed_at": record.get("failed_at", 0)})
        items.sort(key=lambda i: (i["failed_at"], i["url"]))
        return envelope(True, data={**_offset_page(request, items), "total": len(items)})

    @inlineCallbacks
    def requeue_deadletter(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        body = self._body(request, INVALIDATE_ALL_REQUEST)
        if body["host_id"] == 0:
            raise ApiError(400, "host_id is required")
        host = self._host(body["host_id"])
        count = yield self.store.requeue_dead(host.id)
        self.log.info("re-queued {n} dead-lettered entries host_id={host_id}", n=count, host_id=host.id)
        return envelope(True, data={"host_id": host.id, "entries_requeued": count})


# --- query helpers -------------------------------------------------------------------------------


def _arg(request: Request, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


def _limit(request: Request) -> int:
    raw = _arg(request, "limit")
    if raw is None or raw == "":
        return 25
    try:
        limit = int(raw)
    except ValueError:
        raise ApiError(400, "limit must be a valid integer") from None
    if not 1 <= limit <= 100:
        raise ApiError(400, "limit must be between 1 and 100")
    return limit


def _offset_page(request: Request, items: list[dict[str, Any]]) -> dict[str, Any]:
    """One page of *items* by ``limit`` and a decimal offset ``cursor`` (non-numeric is 0, as in Go)."""
    limit = _limit(request)
    try:
        offset = max(0, int(_arg(request, "cursor") or "0"))
    except ValueError:
        offset = 0
    more = offset + limit < len(items)
    return {"items": items[offset : offset + limit], "cursor": str(offset + limit) if more else "0", "has_more": more}


def _split_cursor(cursor: str) -> tuple[bytes, int]:
    """``"<scan cursor>"`` or ``"<scan cursor>-<entries of that batch already returned>"``."""
    scan, _, skip = cursor.partition("-")
    try:
        return scan.encode() or b"0", max(0, int(skip)) if skip else 0
    except ValueError:
        return scan.encode() or b"0", 0


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def _int(value: bytes | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def _item(fields: dict[bytes, bytes], now: int, stale_ttl: float) -> dict[str, Any]:
    expires = _int(fields.get(b"expires_at"))
    created = _int(fields.get(b"created_at"))
    status = "active" if now < expires else "stale" if now < expires + stale_ttl else "expired"
    item: dict[str, Any] = {
        "url": _text(fields.get(b"url")), "title": _text(fields.get(b"title")),
        "dimension": _text(fields.get(b"dimension")), "status": status, "cache_age": now - created,
        "size": _int(fields.get(b"size")), "disk_size": _int(fields.get(b"disk_size")),
        "last_access": _int(fields.get(b"last_access")), "cache_key": _text(fields.get(b"key")),
        "created_at": created, "expires_at": expires, "status_code": _int(fields.get(b"status_code")),
        "source": _text(fields.get(b"source")), "index_status": _int(fields.get(b"index_status")),
    }
    last_bot_hit = _int(fields.get(b"last_bot_hit"))
    if last_bot_hit:
        item["last_bot_hit"] = last_bot_hit
    return item


def _ordered(item: dict[str, Any]) -> dict[str, Any]:
    return {k: item[k] for k in ITEM_FIELDS if k in item}


def _csv(request: Request, name: str) -> list[str] | None:
    raw = _arg(request, name)
    if raw is None or raw == "":
        return None
    return [part.strip() for part in raw.split(",")]


def _non_negative(request: Request, name: str) -> int:
    raw = _arg(request, name)
    if raw is None or raw == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a valid integer") from None
    if value < 0:
        raise ApiError(400, f"{name} must be >= 0")
    return value


class _CacheFilters:
    def __init__(self) -> None:
        self.status: set[str] | None = None
        self.dimension: set[str] | None = None
        self.url_contains = ""
        self.size = (0, 0)
        self.age = (0, 0)
        self.status_code: set[int] | None = None
        self.source: str | None = None
        self.index_status: set[int] | None = None

    @classmethod
    def parse(cls, request: Request, host: Host) -> _CacheFilters:
        f = cls()
        statuses = _csv(request, "status")
        if statuses is not None:
            for s in statuses:
                if s not in ("active", "stale", "expired"):
                    raise ApiError(400, f"invalid status filter: {s}")
            f.status = set(statuses)
        dims = _csv(request, "dimension")
        if dims is not None:
            known = host.dimension_by_name
            for d in dims:
                if d not in known:
                    raise ApiError(400, f"dimension '{d}' not configured for host")
            f.dimension = set(dims)
        contains = _arg(request, "url_contains") or ""
        if len(contains.encode()) > 200:
            raise ApiError(400, "url_contains must be at most 200 characters")
        f.url_contains = contains.lower()
        f.size = (_non_negative(request, "size_min"), _non_negative(request, "size_max"))
        if f.size[0] > 0 and f.size[1] > 0 and f.size[1] < f.size[0]:
            raise ApiError(400, "size_max must be >= size_min")
        f.age = (_non_negative(request, "cache_age_min"), _non_negative(request, "cache_age_max"))
        if f.age[0] > 0 and f.age[1] > 0 and f.age[1] < f.age[0]:
            raise ApiError(400, "cache_age_max must be >= cache_age_min")
        codes = _csv(request, "status_code")
        if codes is not None:
            try:
                f.status_code = {int(c) for c in codes}
            except ValueError:
                bad = next(c for c in codes if not c.lstrip("-").isdigit())
                raise ApiError(400, f"invalid status_code filter: {bad} (must be numeric)") from None
        source = _arg(request, "source")
        if source:
            if source not in ("render", "bypass"):
                raise ApiError(400, "source must be 'render' or 'bypass'")
            f.source = source
        index = _csv(request, "index_status")
        if index is not None:
            for i in index:
                if i not in ("1", "2", "3", "4"):
                    raise ApiError(400, f"invalid index_status filter: {i}")
            f.index_status = {int(i) for i in index}
        return f

    def match(self, item: dict[str, Any], fields: dict[bytes, bytes], now: int) -> bool:
        if self.status is not None and item["status"] not in self.status:
            return False
        if self.dimension is not None and item["dimension"] not in self.dimension:
            return False
        if self.url_contains and self.url_contains not in item["url"].lower():
            return False
        if self.size[0] and item["size"] < self.size[0] or self.size[1] and item["size"] > self.size[1]:
            return False
        if self.age[0] and item["cache_age"] < self.age[0] or self.age[1] and item["cache_age"] > self.age[1]:
            return False
        if self.status_code is not None and item["status_code"] not in self.status_code:
            return False
        if self.source is not None and item["source"] != self.source:
            return False
        if self.index_status is not None and item["index_status"] not in self.index_status:
            return False
        return True
