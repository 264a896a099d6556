"""The fast text formatter gives exactly what Twisted's does, for every kind of event."""

from __future__ import annotations

import time
from typing import Any

import pytest
from twisted.logger import LogLevel, formatEvent, formatEventAsClassicLogText, formatTime
from twisted.python.failure import Failure

from cachesvc.observe.textformat import ClassicText, SecondClock, message


def twisted_line(event: dict[str, Any]) -> str | None:
    """What twistd's ``textFileLogObserver`` writes for *event*."""
    return formatEventAsClassicLogText(event, formatTime=lambda when: formatTime(when))


class Thing:
    name = "thing"

    def __repr__(self) -> str:
        return "<Thing>"


def _failure() -> Failure:
    try:
        raise ValueError("boom")
    except ValueError:
        return Failure()


NOW = 1_764_590_000.25
EVENTS: list[dict[str, Any]] = [
    {"log_format": "purge {path!r} {outcome}{detail}, {ms:.1f} ms", "path": "/c/x", "outcome": "deleted",
     "detail": ", 1 files", "ms": 0.42},
    {"log_format": "plain text"},
    {"log_format": "braces {{literal}} and {n:>{width}}", "n": 7, "width": 5},
    {"log_format": "attr {t.name} index {seq[1]} key {d[k]}", "t": Thing(), "seq": [1, 2], "d": {"k": "v"}},
    {"log_format": "call {f()}", "f": lambda: "called"},
    {"log_format": "missing {nothere}"},
    {"log_format": "positional {0}"},
    {"log_format": "bad spec {n:zz}", "n": 1},
    {"log_format": b"bytes {x}", "x": 1},
    {"log_format": None},
    {"log_format": ""},
    {},
    {"log_format": "two\nlines {x}", "x": "and\nthree"},
    {"log_format": "obj {t} {t!r} {t!s} {t!a}", "t": Thing()},
    {"log_format": "unicode {u}", "u": "caf\u00e9 \udcff"},
    {"log_format": "with failure {x}", "x": 1, "log_failure": _failure()},
    {"log_format": "legacy", "log_flattened": {"x": "1"}},
]
SYSTEMS: list[dict[str, Any]] = [
    {"log_namespace": "cachesvc.purge.purger.Purger", "log_level": LogLevel.info},
    {"log_namespace": "ns"},
    {"log_level": LogLevel.warn},
    {"log_system": "-"},
    {"log_system": "a\nb"},
    {"log_system": 42},
    {},
]
TIMES: list[float | None] = [NOW, NOW + 0.9999996, NOW + 0.9999994, float(int(NOW)), None, 0.0]


@pytest.mark.parametrize("event", EVENTS, ids=range(len(EVENTS)))
@pytest.mark.parametrize("system", SYSTEMS, ids=range(len(SYSTEMS)))
@pytest.mark.parametrize("when", TIMES, ids=range(len(TIMES)))
def test_classic_lines_are_twisteds_byte_for_byte(event: dict[str, Any], system: dict[str, Any],
                                                 when: float | None) -> None:
    full = {**event, **system, **({} if when is None else {"log_time": when})}
    assert ClassicText()(dict(full)) == twisted_line(dict(full))


@pytest.mark.parametrize("event", EVENTS, ids=range(len(EVENTS)))
def test_messages_are_formatevents(event: dict[str, Any]) -> None:
    assert message(dict(event)) == formatEvent(dict(event))


def test_the_second_clock_follows_the_clock_across_seconds_and_rounding() -> None:
    clock = SecondClock()
    start = int(time.time())
    for step in range(0, 3_000_000, 49_999):  # three seconds in uneven steps, each second met twice
        when = start + step / 1_000_000
        assert clock(when) == formatTime(when)
    for when in (start + 0.9999999, start + 1.0, start + 1.5, start + 0.1):  # back and forth
        assert clock(when) == formatTime(when)
