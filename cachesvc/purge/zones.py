"""From a URL to the nginx cache files that hold it, computed as nginx computes them.

nginx names a cache file ``md5(key)`` in lower-case hex, below ``levels`` directories cut from the
*end* of the hash (``levels=1:2`` puts ``…0921710ccd5`` in ``5/cd/``). The key is the zone's
``fastcgi_cache_key`` with nginx variables filled in from the request; here the request is the
URL a client asks to purge.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from cachesvc.purge.paths import PathPolicy, PurgeTarget, Refused

VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_URL_END_OF_AUTHORITY = re.compile(r"[/?#]")
_UNSAFE_IN_REQUEST = re.compile(rb"[^\x21-\x7e]")  # what a client percent-encodes before sending

VARIABLES = ("scheme", "request_method", "host", "http_host", "request_uri", "uri", "args", "query_string", "is_args")
"""nginx variables a purge URL can fill in. ``$uri`` is the decoded path with ``//`` merged."""


@dataclass(frozen=True)
class Request:
    """The parts of a URL that nginx variables are made of."""

    scheme: str
    host: str  # lower-case, without port: nginx $host
    http_host: str  # as written, with port: nginx $http_host
    path: str  # as sent on the wire (non-ASCII percent-encoded)
    query: str | None  # None when the URL has no "?"

    @property
    def request_uri(self) -> str:
        return self.path if self.query is None else f"{self.path}?{self.query}"

    def twin(self) -> Request:
        """The same URL with the trailing slash toggled: WordPress serves both, nginx caches both."""
        if self.path == "/":
            return self
        path = self.path[:-1] if self.path.endswith("/") else self.path + "/"
        return Request(self.scheme, self.host, self.http_host, path, self.query)

    def variables(self, method: str) -> dict[str, str]:
        query = self.query or ""
        return {
            "scheme": self.scheme,
            "request_method": method,
            "host": self.host,
            "http_host": self.http_host,
            "request_uri": self.request_uri,
            "uri": re.sub("/+", "/", unquote(self.path)),
            "args": query,
            "query_string": query,
            "is_args": "?" if query else "",
        }


def parse_url(url: str) -> Request:
    """Split an ``http(s)://`` URL the way it would reach nginx; raise ``Refused`` if it cannot."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https"):
        raise Refused("not an http:// or https:// URL")
    cut = _URL_END_OF_AUTHORITY.search(rest)
    authority, tail = (rest[: cut.start()], rest[cut.start() :]) if cut else (rest, "")
    authority = authority.rpartition("@")[2]
    host = authority[: authority.find("]") + 1] if authority.startswith("[") else authority.partition(":")[0]
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]  # one trailing dot, as nginx's $host drops it
    if not host or host in (".", "..") or "\\" in host:
        raise Refused("URL has no usable host")
    tail = tail.partition("#")[0]
    path, qmark, query = tail.partition("?")
    path = path or "/"
    return Request(scheme, host, authority, _as_sent(path), _as_sent(query) if qmark else None)


def _as_sent(text: str) -> str:
    raw = text.encode("utf-8")
    return _UNSAFE_IN_REQUEST.sub(lambda m: b"%%%02X" % m.group()[0], raw).decode("ascii")


def render_key(template: str, variables: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: variables[m.group(1) or m.group(2)], template)


def cache_file(zone_dir: str, levels: Sequence[int], key: str) -> str:
    digest = hashlib.md5(key.encode("utf-8")).hexdigest()
    end = len(digest)
    parts = [zone_dir]
    for width in levels:
        parts.append(digest[end - width : end])
        end -= width
    parts.append(digest)
    return "/".join(parts)


@dataclass(frozen=True)
class Zone:
    """A checked zone (``purge.config.check_zone`` makes them): hosts, directory, levels, key, methods."""

    hosts: frozenset[str]  # lower-case; "*" matches any host
    path: str  # may hold {host}
    levels: tuple[int, ...]
    key: str
    methods: tuple[str, ...]
    mode: str = "hard"  # for purges without soft:/hard: in this zone

    def matches(self, host: str) -> bool:
        return "*" in self.hosts or host in self.hosts

    def directory(self, host: str) -> str:
        return self.path.replace("{host}", host)


class ZoneMap:
    """Finds the cache files and key prefixes of a URL in every configured zone that serves its host."""

    def __init__(self, zones: Sequence[Zone], policy: PathPolicy) -> None:
        self.policy = policy
        self.zones = tuple(zones)
        self._directories = [
            (re.compile("[^/]+".join(re.escape(part) for part in zone.path.split("{host}")) + "(?:/|$)"), zone)
            for zone in self.zones
        ]

    def zone_of(self, target: PurgeTarget) -> Zone | None:
        """The first configured zone whose directory is *target* or holds it (for its purge mode)."""
        path = target.path
        return next((zone for pattern, zone in self._directories if pattern.match(path)), None)

    def files(self, url: str) -> list[PurgeTarget]:
        """Every cache file that may hold *url*: each matching zone, method, and the trailing-slash twin."""
        found: list[PurgeTarget] = []
        for _, targets in self.files_by_zone(url):
            found.extend(t for t in targets if t not in found)
        return found

    def files_by_zone(self, url: str) -> list[tuple[Zone, list[PurgeTarget]]]:
        """:meth:`files`, grouped by the zone that holds them (a file in two zones is listed under the first)."""
        request = parse_url(url)
        seen: set[PurgeTarget] = set()
        found: list[tuple[Zone, list[PurgeTarget]]] = []
        for zone, directory in self._zones_for(request):
            targets: list[PurgeTarget] = []
            for variant in dict.fromkeys([request, request.twin()]):
                for method in zone.methods:
                    key = render_key(zone.key, variant.variables(method))
                    target = self.policy.target(cache_file(directory, zone.levels, key).encode())
                    if target not in seen:
                        seen.add(target)
                        targets.append(target)
            found.append((zone, targets))
        return found

    def prefixes(self, url: str) -> list[tuple[PurgeTarget, list[bytes]]]:
        """For ``…/blog/*``: each matching zone directory and the key prefixes to delete in it."""
        return [(directory, keys) for _, directory, keys in self.prefixes_by_zone(url)]

    def prefixes_by_zone(self, url: str) -> list[tuple[Zone, PurgeTarget, list[bytes]]]:
        """:meth:`prefixes`, with the zone each directory belongs to."""
        request = parse_url(url)
        found: list[tuple[Zone, PurgeTarget, list[bytes]]] = []
        for zone, directory in self._zones_for(request):
            tail = VARIABLE.split(zone.key)[-1]
            last = list(VARIABLE.finditer(zone.key))
            if tail or not last or (last[-1].group(1) or last[-1].group(2)) not in ("request_uri", "uri"):
                raise Refused("prefix purge needs a zone key that ends with $request_uri or $uri")
            keys = [render_key(zone.key, request.variables(m)).encode() for m in zone.methods]
            found.append((zone, self.policy.target(directory.encode()), list(dict.fromkeys(keys))))
        return found

    def _zones_for(self, request: Request) -> Iterator[tuple[Zone, str]]:
        matched = False
        for zone in self.zones:
            if zone.matches(request.host):
                matched = True
                yield zone, zone.directory(request.host)
        if not matched:
            raise Refused(f"no purge.zones entry serves host {request.host!r}")
