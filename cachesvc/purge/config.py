"""The ``purge:`` section: its schema, and the checks that turn it into :class:`PurgeSettings`.

The daemon deletes with privileges, so everything is checked before anything listens: the
endpoint, the roots (absolute, existing, never ``/``), the trash (outside every nginx zone) and
each zone (nginx syntax, below a root). Checking returns a new, resolved value; the parsed
section is left as it was.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cachesvc.configfile import ConfigError, Duration, check_server_endpoint, label, shown
from cachesvc.purge.clusterconfig import ClusterConfig, ClusterSettings, check_cluster
from cachesvc.purge.paths import PathPolicy, Refused
from cachesvc.purge.tags import DEFAULT_HEADERS
from cachesvc.purge.zones import VARIABLE, VARIABLES, Zone


@dataclass
class ZoneConfig:
    """One nginx cache zone, described as nginx's ``fastcgi_cache_path``/``fastcgi_cache_key`` do."""

    hosts: list[str]
    path: str
    levels: str = "1:2"
    key: str = "$scheme$request_method$host$request_uri"
    methods: list[str] = field(default_factory=lambda: ["GET", "HEAD"])
    mode: str | None = None  # hard | soft; None: purge.mode


MODES = ("hard", "soft")
"""What a purge does to the entries it names: ``hard`` deletes them, ``soft`` marks them expired."""


@dataclass
class WarmOrigins:
    """Where nginx listens, per scheme: warm requests go there with the site's ``Host``."""

    http: str = "http://127.0.0.1:80"
    https: str = "https://127.0.0.1:443"


@dataclass
class WarmConfig:
    """``purge.warm``: after a purge, re-request what it removed so that the next visitor finds a HIT."""

    enabled: bool = False
    origins: WarmOrigins = field(default_factory=WarmOrigins)
    concurrency: int = 4
    max_entries: int = 10000
    delay: Duration = 0.0
    slow_response: Duration = 2.0
    timeout: Duration = 10.0


@dataclass(frozen=True)
class WarmSettings:
    """``purge.warm`` checked: *origins* maps ``http``/``https`` to ``scheme://host:port`` (no path)."""

    enabled: bool = False
    origins: tuple[tuple[str, str], ...] = (("http", "http://127.0.0.1:80"), ("https", "https://127.0.0.1:443"))
    concurrency: int = 4
    max_entries: int = 10000
    delay: float = 0.0
    slow_response: float = 2.0
    timeout: float = 10.0

    def origin(self, scheme: str) -> str | None:
        """Where warm requests for *scheme* URLs go, or ``None`` if that scheme has no origin."""
        return dict(self.origins).get(scheme)


@dataclass
class TagsConfig:
    """``purge.tags``: an index of the cache by the tags each entry's stored response header names."""

    enabled: bool = False
    headers: list[str] = field(default_factory=lambda: list(DEFAULT_HEADERS))


@dataclass(frozen=True)
class TagsSettings:
    enabled: bool = False
    headers: tuple[str, ...] = DEFAULT_HEADERS


@dataclass
class PurgeConfig:
    """The ``purge:`` section as written: the SpinupWP-compatible purge service."""

    listen: str = "tcp:7836:interface=127.0.0.1"
    roots: list[str] = field(default_factory=lambda: ["/cache"])
    idle_timeout: Duration = 30.0
    max_line_length: int = 4096
    trash_dir: str | None = None
    zones: list[ZoneConfig] = field(default_factory=list)
    max_connections: int = 512
    mode: str = "hard"
    warm: WarmConfig = field(default_factory=WarmConfig)
    tags: TagsConfig = field(default_factory=TagsConfig)
    cluster: ClusterConfig | None = None


@dataclass(frozen=True)
class PurgeSettings:
    """The purge section checked and resolved: what the purge service runs on."""

    listen: str
    roots: tuple[str, ...]  # normalised, absolute, existing directories
    idle_timeout: float
    max_line_length: int
    trash_dir: str  # absolute; a direct child of a root or outside every root
    zones: tuple[Zone, ...]
    max_connections: int = 512
    mode: str = "hard"  # for lines without soft:/hard:, in no zone with a mode of its own
    warm: WarmSettings = WarmSettings()
    tags: TagsSettings = TagsSettings()
    cluster: ClusterSettings | None = None


def check_purge(purge: PurgeConfig, source: str | None = None) -> PurgeSettings:
    """Refuse a purge section that cannot run safely; return what it resolves to."""
    check_server_endpoint(
        purge.listen, "purge.listen", source, "tcp:7836:interface=127.0.0.1 or unix:/run/cachesvc/purge.sock"
    )
    if purge.idle_timeout <= 0:
        raise ConfigError(f"{label('purge.idle_timeout', source)}: must be > 0, e.g. 30s")
    if not 1 <= purge.max_line_length <= 1 << 20:
        raise ConfigError(
            f"{label('purge.max_line_length', source)}: {purge.max_line_length} is out of range; "
            "use 1 to 1048576 (default 4096)"
        )
    if not 1 <= purge.max_connections <= 1 << 20:
        raise ConfigError(
            f"{label('purge.max_connections', source)}: {purge.max_connections} is out of range; "
            "use 1 to 1048576 (default 512)"
        )
    _check_mode(purge.mode, "purge.mode", source)
    roots = _check_roots(purge.roots, source)
    zones = []
    for i, zone in enumerate(purge.zones):
        try:
            zones.append(check_zone(zone, roots, purge.mode))
        except ValueError as e:
            raise ConfigError(f"{label(f'purge.zones[{i}]', source)}: {e}") from None
    return PurgeSettings(
        listen=purge.listen,
        roots=roots,
        idle_timeout=purge.idle_timeout,
        max_line_length=purge.max_line_length,
        trash_dir=_check_trash(purge.trash_dir, roots, source),
        zones=tuple(zones),
        max_connections=purge.max_connections,
        mode=purge.mode,
        warm=_check_warm(purge.warm, source),
        tags=_check_tags(purge.tags, source),
        cluster=None if purge.cluster is None else check_cluster(purge.cluster, source),
    )


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")


def _check_tags(tags: TagsConfig, source: str | None) -> TagsSettings:
    if not tags.headers:
        raise ConfigError(
            f"{label('purge.tags.headers', source)}: list at least one response header, e.g. [X-Cache-Tags]"
        )
    for i, name in enumerate(tags.headers):
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError(
                f"{label(f'purge.tags.headers[{i}]', source)}: {shown(name)} is not an HTTP header name "
                "(letters, digits and -, at most 64 characters), e.g. X-Cache-Tags"
            )
    return TagsSettings(enabled=tags.enabled, headers=tuple(tags.headers))


def _check_mode(mode: str, where: str, source: str | None) -> None:
    if mode not in MODES:
        raise ConfigError(
            f"{label(where, source)}: {shown(mode)} is not a purge mode; use hard (delete the entries) "
            "or soft (mark them expired: nginx serves them STALE while it refreshes them)"
        )


def _check_warm(warm: WarmConfig, source: str | None) -> WarmSettings:
    origins = []
    for scheme in ("http", "https"):
        url = getattr(warm.origins, scheme)
        where = label(f"purge.warm.origins.{scheme}", source)
        example = f"{scheme}://127.0.0.1:{80 if scheme == 'http' else 443}"
        parsed = urlsplit(url) if url.isprintable() else None
        try:
            port = parsed.port if parsed else None
        except ValueError:
            parsed = None
        if parsed is None or parsed.scheme != scheme or not parsed.hostname or parsed.path not in ("", "/") \
                or parsed.query or parsed.fragment or parsed.username or parsed.password:
            raise ConfigError(
                f"{where}: {shown(url)} is not an origin; give {scheme}:// and where nginx listens for "
                f"{scheme} requests, with no path, e.g. {example}"
            )
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        origins.append((scheme, f"{scheme}://{host}:{port or (80 if scheme == 'http' else 443)}"))
    for name, minimum in (("concurrency", 1), ("max_entries", 1)):
        value = getattr(warm, name)
        if not minimum <= value <= 1_000_000:
            raise ConfigError(f"{label(f'purge.warm.{name}', source)}: {value} is out of range; use 1 to 1000000")
    if warm.delay < 0:
        raise ConfigError(f"{label('purge.warm.delay', source)}: must be 0s or more, e.g. 0s or 5s")
    for name in ("slow_response", "timeout"):
        if getattr(warm, name) <= 0:
            raise ConfigError(f"{label(f'purge.warm.{name}', source)}: must be more than 0s, e.g. 2s")
    return WarmSettings(
        enabled=warm.enabled, origins=tuple(origins), concurrency=warm.concurrency, max_entries=warm.max_entries,
        delay=warm.delay, slow_response=warm.slow_response, timeout=warm.timeout,
    )


def _check_roots(roots: Sequence[str], source: str | None) -> tuple[str, ...]:
    if not roots:
        raise ConfigError(f"{label('purge.roots', source)}: list at least one cache root, e.g. [/cache]")
    normalised: list[str] = []
    for i, root in enumerate(roots):
        where = label(f"purge.roots[{i}]", source)
        if not root.startswith("/"):
            raise ConfigError(f"{where}: {shown(root)} is relative; give the absolute path of the cache directory")
        norm = os.path.normpath(root)
        if norm.startswith("//"):
            norm = "/" + norm.lstrip("/")
        if norm == "/":
            raise ConfigError(
                f"{where}: {shown(root)} would let clients delete the whole filesystem; name the cache directory"
            )
        if not os.path.isdir(norm):
            what = "does not exist" if not os.path.exists(norm) else "is not a directory"
            raise ConfigError(f"{where}: {shown(root)} {what}; create it (owned by the nginx user) or fix the path")
        real = os.path.realpath(norm)
        if real != norm:
            what = "is a symlink" if os.path.islink(norm) else "passes through a symlink"
            raise ConfigError(
                f"{where}: {shown(root)} {what} (to {real}); purges never follow symlinks, so give the real path, "
                f"e.g. {real}"
            )
        if norm in normalised:
            raise ConfigError(f"{where}: {shown(root)} is listed twice")
        normalised.append(norm)
    return tuple(normalised)


def _check_trash(trash_dir: str | None, roots: Sequence[str], source: str | None) -> str:
    """The trash must be outside every nginx zone: a root's hidden child, or outside the roots."""
    where = label("purge.trash_dir", source)
    trash = trash_dir or os.path.join(roots[0], ".cachesvc-trash")
    if not trash.startswith("/"):
        raise ConfigError(f"{where}: {shown(trash)} is relative; give an absolute path on the cache's filesystem")
    trash = os.path.normpath(trash)
    for root in roots:
        if trash == root or root.startswith(trash + "/"):
            raise ConfigError(
                f"{where}: {shown(trash)} would contain the cache root {root}; use e.g. {root}/.cachesvc-trash"
            )
        if trash.startswith(root + "/") and os.path.dirname(trash) != root:
            raise ConfigError(
                f"{where}: {shown(trash)} is inside a cache zone, where nginx's cache loader deletes foreign files; "
                f"use a direct child of the root such as {root}/.cachesvc-trash"
            )
    parent = os.path.dirname(trash)
    if not os.path.isdir(parent):
        raise ConfigError(f"{where}: the parent of {shown(trash)} does not exist; create it or choose another path")
    if os.path.islink(trash) or (os.path.exists(trash) and not os.path.isdir(trash)):
        raise ConfigError(
            f"{where}: {shown(trash)} exists and is not a plain directory; remove it or choose another path"
        )
    if os.path.isdir(trash) and os.lstat(trash).st_mode & 0o022:
        raise ConfigError(
            f"{where}: {shown(trash)} is writable by group or others, who could plant what the daemon deletes; "
            f"chmod 700 {trash} (or remove it: the daemon creates it with mode 0700)"
        )
    return trash


def check_zone(zone: ZoneConfig, roots: Sequence[str], default_mode: str = "hard") -> Zone:
    """The :class:`Zone` *zone* describes; ``ValueError`` with the fix when it is not an nginx cache below *roots*."""
    if not zone.hosts:
        raise ValueError('hosts: list the host names this zone caches, or ["*"] for any host')
    levels = zone.levels.split(":") if zone.levels else []
    if len(levels) > 3 or any(n not in ("1", "2") for n in levels):
        raise ValueError(
            f"levels: {shown(zone.levels)} is not nginx syntax; write up to three 1s or 2s joined by ':', e.g. 1:2"
        )
    for m in VARIABLE.finditer(zone.key):
        name = m.group(1) or m.group(2)
        if name not in VARIABLES:
            raise ValueError(f"key: ${name} is not supported; use {', '.join('$' + v for v in VARIABLES)}")
    if "$" in VARIABLE.sub("", zone.key):
        raise ValueError(f"key: {shown(zone.key)} has a '$' that is not a variable")
    if not zone.methods or any(not m.isalpha() for m in zone.methods):
        raise ValueError(f"methods: {shown(zone.methods)}; list HTTP methods, e.g. [GET, HEAD]")
    if zone.mode is not None and zone.mode not in MODES:
        raise ValueError(
            f"mode: {shown(zone.mode)} is not a purge mode; use hard or soft, or leave it out for purge.mode"
        )
    sample = zone.path.replace("{host}", "example.com")
    try:
        PathPolicy(roots).target(sample.encode())
    except Refused as e:
        raise ValueError(
            f"path: {shown(zone.path)} is not below a cache root ({e}); e.g. {roots[0]}/{{host}}"
        ) from None
    return Zone(
        frozenset(h.lower() for h in zone.hosts),
        zone.path.rstrip("/"),
        tuple(int(n) for n in levels),
        zone.key,
        tuple(m.upper() for m in zone.methods),
        zone.mode or default_mode,
    )
