"""twistd's log text, byte for byte, at a fraction of its cost: one line per purge is the daemon's hot path.

Twisted formats every event by parsing its format string with :class:`string.Formatter` (in
Python) and its time with ``datetime`` and ``strftime``. Here the message goes through the C
``str.format_map`` whenever that gives the same text (every format without Twisted's ``{name()}``
call syntax, which falls back), and the time prefix is computed once per second. Anything unusual
(a failure, a flattened or bytes format, an event that does not format) takes Twisted's own path.
"""

from __future__ import annotations

from twisted.logger import LogEvent, formatEvent, formatEventAsClassicLogText, formatTime

_ROUNDS_UP = 0.9999995
"""A fraction of a second from which ``datetime`` rounds a timestamp to the next second."""


class SecondClock:
    """``formatTime(when)`` for twistd's RFC 3339 format, computed once per second of *when*."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, when: float | None) -> str:
        if when is None or when < 0:
            return formatTime(when)
        second = int(when)
        if when - second >= _ROUNDS_UP:  # datetime would show the next second: let it
            return formatTime(when)
        if second != self._second:
            self._text = formatTime(second)
            self._second = second
        return self._text


def message(event: LogEvent) -> str:
    """The event's message, as :func:`twisted.logger.formatEvent` gives it."""
    fmt = event.get("log_format")
    if type(fmt) is str and "log_flattened" not in event:
        try:
            return fmt.format_map(event)
        except Exception:
            pass  # Twisted's "{name()}" calls, a missing key: Twisted says what it says
    return formatEvent(event)


class ClassicText:
    """:func:`twisted.logger.formatEventAsClassicLogText` with its default time format (twistd's lines)."""

    def __init__(self) -> None:
        self._clock = SecondClock()

    def __call__(self, event: LogEvent) -> str | None:
        if "log_failure" in event:
            return formatEventAsClassicLogText(event, formatTime=self._clock)
        text = message(event)
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        elif type(system) is not str:
            return formatEventAsClassicLogText(event, formatTime=self._clock)
        line = f"{self._clock(event.get('log_time'))} [{system}] {text}"
        return (line.replace("\n", "\n\t") if "\n" in line else line) + "\n"
