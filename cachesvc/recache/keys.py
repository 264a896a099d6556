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
``cachesvc:inflight:ended``    ZSET  claim time + "|" + id -> when the claim ended (settled or reaped),
                               for 10 s: a registry snapshot older than the end may still show it
``cachesvc:deadletter:{host}`` HASH  id -> JSON {reason, attempts, failed_at}
``cachesvc:discovery:probe:{token}``  STRING  written once per pub/sub (re)connect when CONFIG is
                                      refused, to see whether keyspace notifications flow (PX 10 s)

where id = queue key + "\\n" + member bytes.
"""

from __future__ import annotations

PRIORITIES = ("high", "normal", "autorecache")

EG_PREFIX = "registry:eg:"
RS_PREFIX = "service:render:"
EG_REGISTRY = EG_PREFIX + "*"
RS_REGISTRY = RS_PREFIX + "*"
REGISTRY_PREFIXES = (EG_PREFIX, RS_PREFIX)
PROBE_PREFIX = "cachesvc:discovery:probe:"

INFLIGHT = "cachesvc:inflight"
STARTED = "cachesvc:inflight:started"
META = "cachesvc:inflight:meta"
ATTEMPTS = "cachesvc:attempts"
ENDED = "cachesvc:inflight:ended"
LEDGER = (INFLIGHT, STARTED, META, ATTEMPTS, ENDED)
"""The ledger's fixed keys, in the order every ledger script takes them as KEYS[1..5]."""


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


def _covering_match(first: str, second: str) -> str:
    """A SCAN MATCH glob that both prefixes' keys match: the two spelled side by side, ``[ab]`` where they differ."""
    return "".join(a if a == b else f"[{a}{b}]" for a, b in zip(first, second, strict=False)) + "*"


REGISTRY_MATCH = _covering_match(EG_PREFIX, RS_PREFIX)
"""One SCAN MATCH for both registries (``[rs]e[gr][iv]…*``): one pass of the keyspace finds both, and the
few other keys it lets through are dropped by prefix. ``meta:cache:*`` keys never match."""


def keyspace_channel(db: int, key_pattern: str) -> str:
    """The keyspace-notification channel (or channel pattern) of *key_pattern* in database *db*."""
    return f"__keyspace@{db}__:{key_pattern}"
