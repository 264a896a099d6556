"""Log lines that clients can cause, at a bounded rate: a burst one by one, then counts.

A client that sends 65,536 empty lines, or opens connections beyond the limit, must not make the
daemon write one log line each (writing them is what froze it). A :class:`LogBudget` lets the
first *burst* events of a window through as they are, counts the rest, and reports the count once
per *period* (``51234 more purge requests refused in the last 10 s``) for as long as they keep
coming; after a quiet period the next event starts a fresh burst.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel


class LogBudget:
    """Emits through *log* at most *burst* lines per *period* seconds, then one count per period."""

    def __init__(self, log: Logger, clock: IReactorTime, what: str, burst: int = 100, period: float = 10.0) -> None:
        self.log = log
        self.clock = clock
        self.what = what  # "purge requests refused": completes "N more ... in the last S s"
        self.burst = burst
        self.period = period
        self._window_end: float | None = None
        self._sent = 0
        self._suppressed = 0
        self._flush_call: IDelayedCall | None = None

    def emit(self, level: LogLevel, format: str, **fields: Any) -> None:
        now = self.clock.seconds()
        fresh = self._window_end is None or now >= self._window_end
        if fresh and self._flush_call is None:  # quiet for a whole period: a fresh burst
            self._window_end = now + self.period
            self._sent = 0
        if self._sent < self.burst:
            self._sent += 1
            self.log.emit(level, format, **fields)
            return
        self._suppressed += 1
        if self._flush_call is None:
            assert self._window_end is not None
            self._flush_call = self.clock.callLater(max(0.0, self._window_end - now), self._flush)

    @property
    def suppressed(self) -> int:
        """Events counted but not yet reported."""
        return self._suppressed

    def _flush(self) -> None:
        self._flush_call = None
        count, self._suppressed = self._suppressed, 0
        self.log.warn("{count} more {what} in the last {seconds:.0f} s", count=count, what=self.what,
                      seconds=self.period)
        # Still flooding: the next window counts from the start (no second burst) until a quiet one.
        self._window_end = self.clock.seconds() + self.period
        self._sent = self.burst
        self._flush_call = self.clock.callLater(self.period, self._quiet_or_flush)

    def _quiet_or_flush(self) -> None:
        if self._suppressed:
            self._flush()
        else:
            self._flush_call = None
            self._window_end = None
