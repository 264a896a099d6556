"""The cache metadata listings: ``/internal/cache/urls`` (filtered, cursor-paged) and ``/summary``.

The URL listing's cursor is ``<scan cursor>`` or ``<scan cursor>-<entries of that batch already
returned>``, so a page resumes exactly where the last one ended (Go's drops the rest of a batch).
Both read the metadata by bounded SCAN steps, each one round trip, so the reactor is free between them.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web.server import Request

from cachesvc.api import query
from cachesvc.api.http import ApiError, envelope
from cachesvc.recache.edgeconfig import EdgeConfig, Host
from cachesvc.recache.store import Store

ITEM_FIELDS = ("url", "title", "dimension", "status", "cache_age", "size", "disk_size", "last_access", "cache_key",
               "created_at", "expires_at", "status_code", "source", "index_status", "last_bot_hit")
SCAN_STEPS = 200  # SCAN calls per page at most, as Go's 200 iterations


class Listings:
    def __init__(self, edge: EdgeConfig, store: Store, clock: Any) -> None:
        self.edge = edge
        self.store = store
        self.clock = clock

    @inlineCallbacks
    def cache_urls(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        host = query.query_host(self.edge, request)
        limit = query.limit(request)
        filters = _CacheFilters.parse(request, host)
        scan_cursor, skip = _split_cursor(query.arg(request, "cursor") or "0")
        now = int(self.clock.seconds())
        items: list[dict[str, Any]] = []
        next_cursor = "0"
        for _ in range(SCAN_STEPS):
            following, entries = yield self.store.scan_metadata(host.id, scan_cursor)
            entries.sort(key=lambda e: e[0])
            following = following.decode() if isinstance(following, bytes) else str(following)
            for index, (_, fields) in enumerate(entries[skip:], start=skip):
                item = _item(fields, now, host.stale_ttl)
                if filters.match(item, fields, now):
                    items.append(item)
                    if len(items) == limit:
                        rest = entries[index + 1 :]
                        next_cursor = f"{scan_cursor.decode()}-{index + 1}" if rest else following
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
        host = query.query_host(self.edge, request)
        now = int(self.clock.seconds())
        totals = {"active": 0, "stale": 0, "expired": 0}
        size = 0
        by_dimension: dict[str, int] = {}
        by_source: dict[str, int] = {}
        cursor = b"0"
        while True:
            cursor, entries = yield self.store.scan_metadata(host.id, cursor, 1000)
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


def _split_cursor(cursor: str) -> tuple[bytes, int]:
    """``"<scan cursor>"`` or ``"<scan cursor>-<entries of that batch already returned>"``.

    The SCAN cursor is Redis's, an unsigned 64-bit decimal; anything else is 400 ``invalid cursor:
    …`` (Go passes the text to SCAN, and Redis's ``ERR invalid cursor`` became a 500).
    """
    scan, dash, skip = cursor.partition("-")
    scan_cursor = query.parse_uint(scan)
    done = query.parse_uint(skip) if dash else 0
    if scan_cursor is None or done is None or done >= 2**63:
        raise ApiError(400, f"invalid cursor: {cursor}")
    return str(scan_cursor).encode(), done


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def _int(value: bytes | None) -> int:
    """A numeric metadata field as Go reads it (``strconv`` refuses it: 0)."""
    return (query.atoi(value.decode("latin-1")) or 0) if value else 0


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
        statuses = query.csv(request, "status")
        if statuses is not None:
            for s in statuses:
                if s not in ("active", "stale", "expired"):
                    raise ApiError(400, f"invalid status filter: {s}")
            f.status = set(statuses)
        dims = query.csv(request, "dimension")
        if dims is not None:
            known = host.dimension_by_name
            for d in dims:
                if d not in known:
                    raise ApiError(400, f"dimension '{d}' not configured for host")
            f.dimension = set(dims)
        contains = query.arg(request, "url_contains") or ""
        if len(contains.encode()) > 200:
            raise ApiError(400, "url_contains must be at most 200 characters")
        f.url_contains = contains.lower()
        f.size = (query.non_negative(request, "size_min"), query.non_negative(request, "size_max"))
        if f.size[0] > 0 and f.size[1] > 0 and f.size[1] < f.size[0]:
            raise ApiError(400, "size_max must be >= size_min")
        f.age = (query.non_negative(request, "cache_age_min"), query.non_negative(request, "cache_age_max"))
        if f.age[0] > 0 and f.age[1] > 0 and f.age[1] < f.age[0]:
            raise ApiError(400, "cache_age_max must be >= cache_age_min")
        codes = query.csv(request, "status_code")
        if codes is not None:
            f.status_code = set()
            for c in codes:
                code = query.atoi(c)
                if code is None:
                    raise ApiError(400, f"invalid status_code filter: {c} (must be numeric)")
                f.status_code.add(code)
        source = query.arg(request, "source")
        if source:
            if source not in ("render", "bypass"):
                raise ApiError(400, "source must be 'render' or 'bypass'")
            f.source = source
        index = query.csv(request, "index_status")
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
        return self.index_status is None or item["index_status"] in self.index_status
