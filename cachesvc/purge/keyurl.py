"""From an nginx cache key back to the URL it was cached for, so that a purge can warm what it removed.

A key is the zone's ``fastcgi_cache_key`` template with nginx variables filled in. Only a template
made of ``$scheme``, ``$request_method``, ``$host``, ``$request_uri`` and literal text can be read
back: the others lose information (``$uri`` is decoded and has ``//`` merged, ``$args`` has no
path). Each variable matches what nginx can put there, and the template must split every key in one
way only: a variable is followed by literal text or a variable that cannot continue it. ``$host``
is lower-case in nginx; that is what tells ``GET`` from ``example.com`` in the usual SpinupWP key
``$scheme$request_method$host$request_uri``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from cachesvc.purge.zones import VARIABLE

NEEDED = "warming needs a key made of $scheme, $request_method, $host, $request_uri and literal text"


def _host_char(c: str) -> bool:
    return not ("A" <= c <= "Z" or c in "/?" or c.isspace() or _control(c))


def _uri_char(c: str) -> bool:
    return not (c.isspace() or _control(c))


def _control(c: str) -> bool:
    return ord(c) < 0x20 or ord(c) == 0x7F


@dataclass(frozen=True)
class _Variable:
    """What nginx can put in a variable: its pattern, the characters it may start and go on with."""

    pattern: str
    starts: Callable[[str], bool]
    continues: Callable[[str], bool]


_VARIABLES = {
    "scheme": _Variable("https?", lambda c: c == "h", lambda c: c == "s"),  # after "http" only "s" goes on
    "request_method": _Variable("[A-Z]+", lambda c: "A" <= c <= "Z", lambda c: "A" <= c <= "Z"),
    "host": _Variable(r"[^A-Z/?\s\x00-\x1f\x7f]+", _host_char, _host_char),
    "request_uri": _Variable(r"/[^\s\x00-\x1f\x7f]*", lambda c: c == "/", _uri_char),
}
# The classes above are ASCII rules plus "anything else": one non-ASCII stand-in covers the rest.
_UNIVERSE = [chr(i) for i in range(128)] + ["\u00e9"]


def why_not_invertible(template: str) -> str | None:
    """Why keys of *template* cannot be turned back into URLs (said once at start-up), or None if they can."""
    compiled = _compile(template)
    return compiled if isinstance(compiled, str) else None


def url_maker(template: str) -> Callable[[str], str | None] | None:
    """A function from a key of *template* to its URL (None for a non-GET or foreign key), or None if not invertible."""
    compiled = _compile(template)
    if isinstance(compiled, str):
        return None
    pattern, has_scheme, has_method = compiled

    def url(key: str) -> str | None:
        found = pattern.fullmatch(key)
        if found is None or (has_method and found["request_method"] != "GET"):
            return None
        scheme = found["scheme"] if has_scheme else "http"
        return f"{scheme}://{found['host']}{found['request_uri']}"

    return url


def _compile(template: str) -> tuple[re.Pattern[str], bool, bool] | str:
    """The key pattern of *template* and whether it has $scheme and $request_method, or why there is none."""
    tokens: list[tuple[str, str]] = []  # ("var", name) or ("text", literal)
    end = 0
    for found in VARIABLE.finditer(template):
        if found.start() > end:
            tokens.append(("text", template[end : found.start()]))
        name = found.group(1) or found.group(2)
        if name not in _VARIABLES:
            return f"key uses ${name}; {NEEDED}"
        tokens.append(("var", name))
        end = found.end()
    if end < len(template):
        tokens.append(("text", template[end:]))
    names = {value for kind, value in tokens if kind == "var"}
    for needed in ("host", "request_uri"):
        if needed not in names:
            return f"key has no ${needed}; {NEEDED}"
    for (kind, name), (next_kind, next_value) in zip(tokens, tokens[1:], strict=False):
        if kind != "var":
            continue
        variable = _VARIABLES[name]
        if next_kind == "text":
            clash = variable.continues(next_value[0])
        else:
            starts = _VARIABLES[next_value].starts
            clash = any(variable.continues(c) and starts(c) for c in _UNIVERSE)
        if clash:
            after = repr(next_value) if next_kind == "text" else f"${next_value}"
            return f"key is ambiguous: ${name} followed by {after} can be split in more than one way; {NEEDED}"
    parts: list[str] = []
    seen: set[str] = set()
    for kind, value in tokens:
        if kind == "text":
            parts.append(re.escape(value))
        elif value in seen:
            parts.append(f"(?P={value})")  # a repeated variable must say the same thing
        else:
            seen.add(value)
            parts.append(f"(?P<{value}>{_VARIABLES[value].pattern})")
    return re.compile("".join(parts)), "scheme" in names, "request_method" in names
