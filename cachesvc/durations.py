"""Duration strings as EdgeComet writes them: Go syntax (``1m30s``, ``250ms``) plus ``d`` and ``w``.

One parser for both halves of the daemon, so ``purge.idle_timeout`` and
``scheduler.tick_interval`` accept the same spellings.
"""

from __future__ import annotations

import re

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign, as Go accepts
    "μs": 1e-6,  # U+03BC greek mu, as Go accepts
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h|d|w)")

HINT = "write a number with a unit (ns, us, ms, s, m, h, d, w), e.g. 30s, 250ms or 1m30s"


def parse_duration(text: str) -> float:
    """Return the duration *text* in seconds; raise ``ValueError`` saying what is wrong."""
    s = text.strip()
    sign = 1.0
    if s[:1] in ("+", "-"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"empty duration; {HINT}")
    total = 0.0
    pos = 0
    while pos < len(s):
        match = _PART.match(s, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r}; {HINT}")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return sign * total


def format_duration(seconds: float) -> str:
    """Render *seconds* compactly for messages (``1.5s``, ``100ms``)."""
    if seconds and abs(seconds) < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
