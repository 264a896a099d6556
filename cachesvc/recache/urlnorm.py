"""EdgeComet's URL normaliser and cache-key hash, reproduced byte for byte.

The Go normaliser (``internal/edge/hash/normalizer.go``) is a thin layer over Go's ``net/url``
(newest Go 1.24 behaviour), so most of this module models ``net/url``: parsing, the escaping modes,
``EscapedPath`` with its raw-path rule, ``ParseQuery``/``QueryEscape`` and ``URL.String``. Go
strings are bytes, so the work is done on ``bytes``. The normalised URL's cache key is
XXH64 (seed 0) of its bytes as 16 lower-case hex digits; normalising is not idempotent, so the key
is computed once, from the normalised form of the URL as received.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import xxhash


class URLError(ValueError):
    """The URL cannot be normalised; ``str()`` is close to Go's error text."""


# net/url encoding modes
PATH, PATH_SEGMENT, HOST, ZONE, USER_PASSWORD, QUERY_COMPONENT, FRAGMENT = range(1, 8)

_ALNUM = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_HOST_SUBDELIMS = frozenset(b"!$&'()*+,;=:[]<>\"")
_RESERVED = frozenset(b"$&+,/:;=?@")
_USERINFO_OK = frozenset(b"-._:~!$&'()*+,;=%@") | _ALNUM
_VALID_ENCODED_OK = frozenset(b"!$&'()*+,;=:@[]%")
MAX_QUERY_PARAMS = 10000  # Go 1.24.12+: GODEBUG urlmaxqueryparams default for go >= 1.24 modules


def should_escape(c: int, mode: int) -> bool:
    if c in _ALNUM:
        return False
    if mode in (HOST, ZONE) and c in _HOST_SUBDELIMS:
        return False
    if c in b"-_.~":
        return False
    if c in _RESERVED:
        if mode == PATH:
            return c == 0x3F  # ?
        if mode == PATH_SEGMENT:
            return c in b"/;,?"
        if mode == USER_PASSWORD:
            return c in b"@/?:"
        if mode == QUERY_COMPONENT:
            return True
        if mode == FRAGMENT:
            return False
    return mode != FRAGMENT or c not in b"!()*"


def escape(s: bytes, mode: int) -> bytes:
    out = bytearray()
    for c in s:
        if c == 0x20 and mode == QUERY_COMPONENT:
            out.append(0x2B)
        elif should_escape(c, mode):
            out += b"%%%02X" % c
        else:
            out.append(c)
    return bytes(out)


def unescape(s: bytes, mode: int) -> bytes:
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == 0x25:  # %
            if i + 2 >= n or s[i + 1] not in _HEX or s[i + 2] not in _HEX:
                raise URLError(f"invalid URL escape {s[i:i + 3].decode('utf-8', 'replace')!r}")
            if mode == HOST and int(s[i + 1 : i + 2], 16) < 8 and s[i : i + 3] != b"%25":
                raise URLError(f"invalid URL escape {s[i:i + 3].decode()!r}")
            if mode == ZONE:
                v = int(s[i + 1 : i + 3], 16)
                if s[i : i + 3] != b"%25" and v != 0x20 and should_escape(v, HOST):
                    raise URLError(f"invalid URL escape {s[i:i + 3].decode()!r}")
            i += 3
        else:
            if mode in (HOST, ZONE) and c < 0x80 and should_escape(c, mode):
                raise URLError(f"invalid character {chr(c)!r} in host name")
            i += 1
    out = bytearray()
    i = 0
    while i < n:
        c = s[i]
        if c == 0x25:
            out.append(int(s[i + 1 : i + 3], 16))
            i += 3
        elif c == 0x2B and mode == QUERY_COMPONENT:
            out.append(0x20)
            i += 1
        else:
            out.append(c)
            i += 1
    return bytes(out)


def _valid_encoded(s: bytes, mode: int) -> bool:
    return all(c in _VALID_ENCODED_OK or not should_escape(c, mode) for c in s)


def _valid_optional_port(port: bytes) -> bool:
    if not port:
        return True
    return port[:1] == b":" and all(0x30 <= c <= 0x39 for c in port[1:])


@dataclass
class URL:
    scheme: bytes = b""
    opaque: bytes = b""
    user: tuple[bytes, bytes | None] | None = None  # (username, password or None)
    host: bytes = b""
    path: bytes = b""
    raw_path: bytes = b""
    omit_host: bool = False
    force_query: bool = False
    raw_query: bytes = b""
    fragment: bytes = b""

    def hostname(self) -> bytes:
        host = self.host
        colon = host.rfind(b":")
        if colon != -1 and _valid_optional_port(host[colon:]):
            host = host[:colon]
        if host.startswith(b"[") and host.endswith(b"]"):
            host = host[1:-1]
        return host

    def escaped_path(self) -> bytes:
        if self.raw_path and _valid_encoded(self.raw_path, PATH):
            try:
                if unescape(self.raw_path, PATH) == self.path:
                    return self.raw_path
            except URLError:
                pass
        if self.path == b"*":
            return b"*"
        return escape(self.path, PATH)

    def string(self) -> bytes:
        buf = bytearray()
        if self.scheme:
            buf += self.scheme + b":"
        if self.opaque:
            buf += self.opaque
        else:
            if (self.scheme or self.host or self.user is not None) and not (
                self.omit_host and not self.host and self.user is None
            ):
                if self.host or self.path or self.user is not None:
                    buf += b"//"
                if self.user is not None:
                    name, password = self.user
                    buf += escape(name, USER_PASSWORD)
                    if password is not None:
                        buf += b":" + escape(password, USER_PASSWORD)
                    buf += b"@"
                if self.host:
                    buf += escape(self.host, HOST)
            path = self.escaped_path()
            if path and path[:1] != b"/" and self.host:
                buf += b"/"
            if not buf and b":" in path.split(b"/", 1)[0]:
                buf += b"./"
            buf += path
        if self.force_query or self.raw_query:
            buf += b"?" + self.raw_query
        if self.fragment:
            buf += b"#" + escape(self.fragment, FRAGMENT)
        return bytes(buf)


def parse(raw: bytes) -> URL:
    """Go's ``url.Parse``."""
    u, hash_, frag = raw.partition(b"#")
    try:
        url = _parse(u)
        if hash_:
            url.fragment = unescape(frag, FRAGMENT)
    except URLError as e:
        raise URLError(f'parse "{raw.decode("utf-8", "replace")}": {e}') from None
    return url


def _parse(raw: bytes) -> URL:
    if any(c < 0x20 or c == 0x7F for c in raw):
        raise URLError("net/url: invalid control character in URL")
    url = URL()
    if raw == b"*":
        url.path = b"*"
        return url
    url.scheme, rest = _get_scheme(raw)
    url.scheme = url.scheme.lower()
    if rest.endswith(b"?") and rest.count(b"?") == 1:
        url.force_query = True
        rest = rest[:-1]
    else:
        rest, _, url.raw_query = rest.partition(b"?")
    if not rest.startswith(b"/"):
        if url.scheme:
            url.opaque = rest
            return url
        if b":" in rest.split(b"/", 1)[0]:
            raise URLError("first path segment in URL cannot contain colon")
    if (url.scheme or not rest.startswith(b"///")) and rest.startswith(b"//"):
        authority, slash, tail = rest[2:].partition(b"/")
        rest = slash + tail
        url.user, url.host = _parse_authority(authority)
    elif url.scheme and rest.startswith(b"/"):
        url.omit_host = True
    url.path = unescape(rest, PATH)
    url.raw_path = b"" if escape(url.path, PATH) == rest else rest
    return url


def _get_scheme(raw: bytes) -> tuple[bytes, bytes]:
    for i, c in enumerate(raw):
        if 0x61 <= c <= 0x7A or 0x41 <= c <= 0x5A:
            continue
        if 0x30 <= c <= 0x39 or c in b"+-.":
            if i == 0:
                return b"", raw
            continue
        if c == 0x3A:
            if i == 0:
                raise URLError("missing protocol scheme")
            return raw[:i], raw[i + 1 :]
        return b"", raw
    return b"", raw


def _parse_authority(authority: bytes) -> tuple[tuple[bytes, bytes | None] | None, bytes]:
    i = authority.rfind(b"@")
    host = _parse_host(authority if i < 0 else authority[i + 1 :])
    if i < 0:
        return None, host
    userinfo = authority[:i]
    if not all(c in _USERINFO_OK for c in userinfo):
        raise URLError("net/url: invalid userinfo")
    if b":" not in userinfo:
        return (unescape(userinfo, USER_PASSWORD), None), host
    name, _, password = userinfo.partition(b":")
    return (unescape(name, USER_PASSWORD), unescape(password, USER_PASSWORD)), host


def _parse_host(host: bytes) -> bytes:
    open_bracket = host.rfind(b"[")
    if open_bracket != -1:
        # Go >= 1.24.8 (CVE-2025-47912): the last '[' starts an IP literal that must be IPv6.
        close = host.rfind(b"]")
        if close < 0:
            raise URLError("missing ']' in host")
        colon_port = host[close + 1 :]
        if not _valid_optional_port(colon_port):
            raise URLError(f'invalid port "{colon_port.decode("utf-8", "replace")}" after host')
        literal = host[open_bracket + 1 : close]
        zone = literal.find(b"%25")
        address = literal if zone < 0 else literal[:zone]
        try:
            ip = ipaddress.ip_address(unescape(address, HOST).decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise URLError(f"invalid IPv6 host {literal.decode('utf-8', 'replace')!r}") from None
        if ip.version != 6:
            raise URLError(f"invalid IPv6 host {literal.decode('utf-8', 'replace')!r}")
        if zone >= 0:
            return b"[" + unescape(address, HOST) + unescape(literal[zone:], ZONE) + b"]" + colon_port
        return unescape(host[open_bracket:], HOST)
    colon = host.rfind(b":")
    if colon != -1 and not _valid_optional_port(host[colon:]):
        raise URLError(f'invalid port "{host[colon:].decode("utf-8", "replace")}" after host')
    return unescape(host, HOST)


def parse_query(query: bytes) -> dict[bytes, list[bytes]]:
    """Go's ``url.ParseQuery``; raises ``URLError`` where Go returns an error."""
    if query.count(b"&") + 1 > MAX_QUERY_PARAMS:
        raise URLError("number of URL query parameters exceeded limit")
    values: dict[bytes, list[bytes]] = {}
    error: URLError | None = None
    for pair in query.split(b"&") if query else []:
        if b";" in pair:
            error = error or URLError("invalid semicolon separator in query")
            continue
        if not pair:
            continue
        key, _, value = pair.partition(b"=")
        try:
            key = unescape(key, QUERY_COMPONENT)
            value = unescape(value, QUERY_COMPONENT)
        except URLError as e:
            error = error or e
            continue
        values.setdefault(key, []).append(value)
    if error is not None:
        raise error
    return values


def normalize_path(path: bytes) -> bytes:
    while b"//" in path:
        path = path.replace(b"//", b"/")
    resolved: list[bytes] = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if resolved and resolved[-1] != b"..":
                resolved.pop()
        else:
            resolved.append(part)
    result = b"/" + b"/".join(resolved)
    if len(result) > 1 and path.endswith(b"/"):
        result += b"/"
    return result


def normalize_query(raw_query: bytes) -> bytes:
    if not raw_query:
        return b""
    try:
        values = parse_query(raw_query)
    except URLError:
        return raw_query
    parts = []
    for key in sorted(values):
        for value in values[key]:
            k = escape(key, QUERY_COMPONENT)
            parts.append(k if not value else k + b"=" + escape(value, QUERY_COMPONENT))
    return b"&".join(parts)


def go_to_lower(s: bytes) -> bytes:
    """Go's ``strings.ToLower``: simple case mapping per rune; an invalid byte becomes U+FFFD."""
    if s.isascii():
        return s.lower()
    out = []
    for ch in go_decode_utf8(s):
        low = ch.lower()
        out.append(low if len(low) == 1 else ("i" if ch == "\u0130" else ch))
    return "".join(out).encode("utf-8", "surrogatepass")


def go_decode_utf8(s: bytes) -> str:
    """Decode as Go ranges over a string: each byte of an invalid sequence is one U+FFFD."""
    try:
        return s.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c < 0x80:
            out.append(chr(c))
            i += 1
            continue
        width = 2 if 0xC2 <= c <= 0xDF else 3 if 0xE0 <= c <= 0xEF else 4 if 0xF0 <= c <= 0xF4 else 0
        if width and i + width <= n:
            try:
                out.append(s[i : i + width].decode("utf-8"))
                i += width
                continue
            except UnicodeDecodeError:
                pass
        out.append("\ufffd")
        i += 1
    return "".join(out)


def normalize(raw_url: str | bytes) -> str:
    """EdgeComet's ``Normalize(url, nil)``: the canonical URL, or ``URLError``."""
    raw = raw_url.encode("utf-8", "surrogatepass") if isinstance(raw_url, str) else raw_url
    if b"://" not in raw and not raw.startswith(b"//"):
        raw = b"https://" + raw
    try:
        u = parse(raw)
    except URLError as e:
        raise URLError(f"invalid URL: {e}") from None
    if not u.host:
        raise URLError("invalid URL: missing host")
    hostname = u.hostname()
    if b"." not in hostname and hostname != b"localhost":
        raise URLError(f"invalid URL: invalid host '{u.host.decode('utf-8', 'replace')}'")
    u.scheme = u.scheme.lower()
    u.host = go_to_lower(u.host)
    if u.host.endswith(b"."):
        u.host = u.host[:-1]
    if (u.scheme == b"http" and u.host.endswith(b":80")) or (u.scheme == b"https" and u.host.endswith(b":443")):
        u.host = u.host[: u.host.rfind(b":")]
    u.path = normalize_path(u.path or b"/")
    u.raw_query = normalize_query(u.raw_query)
    u.fragment = b""
    return u.string().decode("utf-8", "surrogateescape")


def url_hash(normalized: str) -> str:
    """The cache key hash: XXH64, seed 0, of the normalised URL's bytes, 16 lower-case hex digits."""
    return xxhash.xxh64(normalized.encode("utf-8", "surrogateescape")).hexdigest()
