"""The write endpoints: recache (enqueue), invalidate and invalidate-all (delete metadata).

Decoding a body of 10,000 URLs, normalising them and encoding the members is about a second of
pure computation, so it runs through *compute* (a worker thread in the daemon) and never holds
the reactor that the purge service shares. Redis work is one script call per chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.web.server import Request

from cachesvc.api import query
from cachesvc.api.http import ApiError, envelope, redis_refusal
from cachesvc.recache import keys
from cachesvc.recache.edgeconfig import EdgeConfig
from cachesvc.recache.members import encode_member
from cachesvc.recache.redisclient import RedisError
from cachesvc.recache.requests import INVALIDATE_ALL_REQUEST, INVALIDATE_REQUEST, RECACHE_REQUEST
from cachesvc.recache.store import Store
from cachesvc.recache.urlnorm import URLError, normalize, url_hash

MAX_URLS = 10000

T = TypeVar("T")
Compute = Callable[[Callable[[], T]], "Deferred[T]"]
"""Runs pure computation off the reactor thread and fires with its result (or its exception)."""


@dataclass(frozen=True)
class _Prepared:
    host_id: int
    urls: int  # as requested
    dimensions: int
    normalized: list[str]
    invalid: list[tuple[str, str]]  # (url, why), logged on the reactor thread
    keys: list[bytes]  # queue members (recache) or metadata keys (invalidate)
    priority: str = ""


def _normalize_all(urls: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    normalized, invalid = [], []
    for url in urls:
        try:
            normalized.append(normalize(url))
        except URLError as e:
            invalid.append((url, str(e)))
    return normalized, invalid


def prepare_recache(data: bytes, edge: EdgeConfig) -> _Prepared:
    """Check a recache body and make its queue members, in the Go daemon's order of checks."""
    body = query.body(data, RECACHE_REQUEST)
    host_id, urls, priority = body["host_id"], body["urls"] or [], body["priority"]
    if host_id == 0:
        raise ApiError(400, "host_id is required")
    if not urls:
        raise ApiError(400, "urls array cannot be empty")
    if len(urls) > MAX_URLS:
        raise ApiError(400, f"urls array cannot exceed {MAX_URLS} entries")
    if priority not in ("high", "normal"):
        raise ApiError(400, "priority must be 'high' or 'normal'")
    dims = query.dimensions(query.host(edge, host_id), body["dimension_ids"])
    normalized, invalid = _normalize_all(urls)
    members = [encode_member(url, dim) for url in normalized for dim in dims]
    return _Prepared(host_id, len(urls), len(dims), normalized, invalid, members, priority)


def prepare_invalidate(data: bytes, edge: EdgeConfig) -> _Prepared:
    """Check an invalidate body and name the metadata keys it deletes, URL by URL, dimension by dimension."""
    body = query.body(data, INVALIDATE_REQUEST)
    host_id, urls = body["host_id"], body["urls"] or []
    if host_id == 0:
        raise ApiError(400, "host_id is required")
    if not urls:
        raise ApiError(400, "urls array cannot be empty")
    dims = query.dimensions(query.host(edge, host_id), body["dimension_ids"])
    normalized, invalid = _normalize_all(urls)
    names = [keys.meta_key(host_id, dim, url_hash(url)).encode() for url in normalized for dim in dims]
    return _Prepared(host_id, len(urls), len(dims), normalized, invalid, names)


class Writes:
    log = Logger()

    def __init__(
        self, edge: EdgeConfig, store: Store, clock: Any, high_queue_limit: int, compute: Compute[_Prepared]
    ) -> None:
        self.edge = edge
        self.store = store
        self.clock = clock
        self.high_queue_limit = high_queue_limit
        self.compute = compute

    def _log_invalid(self, prepared: _Prepared) -> None:
        for url, error in prepared.invalid:
            self.log.error(
                "Invalid URL, skipping url={url!r} host_id={host_id} error={error}",
                url=url, host_id=prepared.host_id, error=error,
            )

    @inlineCallbacks
    def recache(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        data = query.content(request)
        prepared = yield self.compute(lambda: prepare_recache(data, self.edge))
        self._log_invalid(prepared)
        host_id, priority = prepared.host_id, prepared.priority
        limit = self.high_queue_limit if priority == "high" else 0
        result = yield self.store.enqueue(host_id, priority, prepared.keys, int(self.clock.seconds()), limit)
        if not result.ok:
            raise ApiError(
                429,
                f"high priority queue for host {host_id} is full: {max(0, result.free)} of {limit} entries free, "
                f"this request needs more; nothing was enqueued",
            )
        self.log.info(
            "Recache request processed host_id={host_id} priority={priority} urls={urls} entries={entries}",
            host_id=host_id, priority=priority, urls=prepared.urls, entries=result.added,
        )
        return envelope(True, data={
            "host_id": host_id, "urls_count": prepared.urls, "dimension_ids_count": prepared.dimensions,
            "entries_enqueued": result.added, "priority": priority,
        })

    @inlineCallbacks
    def invalidate(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        data = query.content(request)
        prepared = yield self.compute(lambda: prepare_invalidate(data, self.edge))
        self._log_invalid(prepared)
        host_id, dims = prepared.host_id, prepared.dimensions
        deleted = yield self.store.delete_each(prepared.keys)
        for i, url in enumerate(prepared.normalized):
            if not any(deleted[i * dims : (i + 1) * dims]):
                self.log.warn(
                    "No cache metadata found for URL during invalidation url={url!r} host_id={host_id}",
                    url=url, host_id=host_id,
                )
        self.log.info(
            "Invalidate request processed host_id={host_id} urls={urls} entries={entries}",
            host_id=host_id, urls=prepared.urls, entries=sum(deleted),
        )
        return envelope(True, data={
            "host_id": host_id, "urls_count": prepared.urls, "dimension_ids_count": dims,
            "entries_invalidated": sum(deleted),
        })

    @inlineCallbacks
    def invalidate_all(self, request: Request) -> Generator[Deferred[Any], Any, bytes]:
        body = query.body(query.content(request), INVALIDATE_ALL_REQUEST)
        host_id = body["host_id"]
        if host_id == 0:
            raise ApiError(400, "host_id is required")
        dims = query.dimensions(query.host(self.edge, host_id), body["dimension_ids"])
        try:
            deleted = yield self.store.delete_metadata(host_id, body["dimension_ids"] or None)
        except RedisError as e:
            if redis_refusal(e) is not None:  # Redis out of memory or busy: 503 with the reason
                raise
            self.log.error("invalidate-all failed host_id={host_id}: {e}", host_id=host_id, e=e)
            raise ApiError(500, "internal error during invalidation") from None
        self.log.info(
            "Invalidate-all request processed host_id={host_id} entries={entries}", host_id=host_id, entries=deleted
        )
        return envelope(
            True, data={"host_id": host_id, "dimension_ids_count": len(dims), "entries_invalidated": deleted}
        )
