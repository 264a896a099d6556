"""Every Redis key the recache half reads or writes, named in one place.

EdgeComet's keys (shared with the Go Edge Gateway and Render Service, byte for byte):

``recache:{host}:{priority}``        ZSET  member (Go JSON) -> due time
``meta:cache:{host}:{dim}:{hash}``   HASH  cache metadata of one URL and dimension
``registry:eg:{eg_id}``              STRING  an Edge Gateway's registration (TTL)
``service:render:{rs_id}``           STRING  a Render Service's registration and load (TTL)

cachesvc's own, shared by every cachesvc daemon on the Redis (none collide with EdgeComet's):

``cachesvc:inflight``          ZSET  id -> lease expiry (Redis time)
``cachesvc:inflight:started``  ZSET  id -> claim time
``cachesvc:inflight:meta``     HASH  id -> "score|attempts|daemon|claimed_at"
``cachesvc:attempts``          HASH  id -> failed attempts so far (kept across retries)
``cachesvc:deadletter:{host}`` HASH  id -> JSON {reason, attempts, failed_at}

where id = queue key + "\\n" + member bytes.
"""

from __future__ import annotations

PRIORITIES = ("high", "normal", "autorecache")

EG_REGISTRY = "registry:eg:*"
RS_REGISTRY = "service:render:*"

INFLIGHT = "cachesvc:inflight"
STARTED = "cachesvc:inflight:started"
META = "cachesvc:inflight:meta"
ATTEMPTS = "cachesvc:attempts"
LEDGER = (INFLIGHT, STARTED, META, ATTEMPTS)
"""The ledger's fixed keys, in the order every ledger script takes them as KEYS[1..4]."""


def queue_key(host_id: int, priority: str) -> str:
    return f"recache:{host_id}:{priority}"


def queue_prefix(host_id: int) -> str:
    """What every queue key (and so every ledger id) of *host_id* starts with."""
    return f"recache:{host_id}:"


def meta_key(host_id: int, dimension_id: int, url_hash: str) -> str:
    return f"meta:cache:{host_id}:{dimension_id}:{url_hash}"


def meta_pattern(host_id: int) -> str:
    """SCAN pattern of every metadata key of *host_id*."""
    return f"meta:cache:{host_id}:*"


def deadletter_key(host_id: int) -> str:
    """Entries that will not be retried, field = queue key + "\\n" + member."""
    return f"cachesvc:deadletter:{host_id}"
