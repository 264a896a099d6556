"""``purge.cluster``: its schema and check (daemons sharing one Redis purge as one; see purge/cluster.py)."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from cachesvc.configfile import ConfigError, Duration, label, shown


@dataclass
class ClusterConfig:
    """``purge.cluster``: daemons sharing one Redis apply every purge any of them receives."""

    redis: str = "127.0.0.1:6379"
    node: str | None = None  # default: the host name
    stream: str = "cachesvc:purge"
    wait: Duration = 2.0
    retention: Duration = 86400.0
    heartbeat: Duration = 1.0


@dataclass(frozen=True)
class ClusterSettings:
    host: str
    port: int
    password: str
    db: int
    node: str
    stream: str
    wait: float
    retention: float
    heartbeat: float

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def has_password(redis: str) -> bool:
    """Whether the ``purge.cluster.redis`` address *redis* carries a password (``redis://:password@host``)."""
    if "://" not in redis or not redis.isprintable():
        return False
    try:
        return bool(_password(urlsplit(redis)))
    except ValueError:  # not an address: check_cluster says so
        return False


def _password(parsed: SplitResult) -> str:
    return unquote(parsed.password or "")


_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_cluster(cluster: ClusterConfig, source: str | None) -> ClusterSettings:
    """``purge.cluster`` resolved: the Redis address parsed, the node named, the durations in range."""
    where = label("purge.cluster.redis", source)
    example = "127.0.0.1:6379 or redis://:password@10.0.0.5:6379/0"
    text = cluster.redis
    password, db = "", 0
    if "://" in text:
        parsed = urlsplit(text) if text.isprintable() else None
        try:
            port = parsed.port if parsed is not None else None
            ok = parsed is not None and parsed.scheme == "redis" and bool(parsed.hostname) and not parsed.query
            db_text = parsed.path.strip("/") if parsed is not None else ""
            db = int(db_text) if db_text else 0
            ok = ok and db_text.isdigit() if db_text else ok
        except ValueError:
            ok = False
        if not ok or parsed is None or parsed.hostname is None or port == 0:
            raise ConfigError(f"{where}: {shown(text)} is not a Redis address; use {example}")
        if parsed.username:
            raise ConfigError(
                f"{where}: Redis ACL users are not supported; give only the password, e.g. redis://:password@host:6379/0"
            )
        if not 0 <= db <= 1_000_000:
            raise ConfigError(f"{where}: database {db} is out of range; use 0 to 1000000 (usually 0-15)")
        host, password = parsed.hostname, _password(parsed)
        port = port or 6379
    else:
        host, _, port_text = text.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"{where}: {shown(text)} is not a Redis address; use {example}")
        port = int(port_text)
    node = cluster.node or socket.gethostname()
    if not _NODE.fullmatch(node):
        raise ConfigError(
            f"{label('purge.cluster.node', source)}: {shown(node)} is not a node name; use letters, digits, "
            "'.', '_' and '-' (at most 64), unique per daemon, e.g. web-1"
        )
    if not cluster.stream or not cluster.stream.isprintable() or " " in cluster.stream:
        raise ConfigError(f"{label('purge.cluster.stream', source)}: {shown(cluster.stream)}; e.g. cachesvc:purge")
    for name in ("wait", "retention", "heartbeat"):
        if getattr(cluster, name) <= 0:
            raise ConfigError(f"{label(f'purge.cluster.{name}', source)}: must be more than 0s")
    if cluster.retention < 60:
        raise ConfigError(
            f"{label('purge.cluster.retention', source)}: {cluster.retention:g}s is shorter than a restart; "
            "use at least 1m (default 24h)"
        )
    return ClusterSettings(
        host=host, port=port, password=password, db=db, node=node, stream=cluster.stream,
        wait=cluster.wait, retention=cluster.retention, heartbeat=cluster.heartbeat,
    )

