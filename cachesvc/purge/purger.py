"""One purge request, start to finish: policy, deletion, and the one log line that records it."""

from __future__ import annotations

from typing import Any, Generator

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cachesvc.purge.deleter import IDeleter
from cachesvc.purge.paths import PathPolicy, Refused


class Purger:
    """Turns request bytes into ``True`` (purged, or nothing was there) or ``False`` (refused, failed)."""

    log = Logger()

    def __init__(self, policy: PathPolicy, deleter: IDeleter, clock: IReactorTime) -> None:
        self.policy = policy
        self.deleter = deleter
        self.clock = clock

    @inlineCallbacks
    def purge(self, raw: bytes) -> Generator[Deferred[Any], Any, bool]:
        """Fire with whether the purge succeeded. Never fails: every error is logged and is ``False``."""
        started = self.clock.seconds()
        shown = raw.decode("utf-8", "backslashreplace")
        try:
            target = self.policy.target(raw)
            done = yield self.deleter.delete(target)
        except Refused as e:
            self._record(shown, "refused", str(e), 0, started)
            return False
        except OSError as e:
            self._record(shown, "failed", f"{e.strerror or e} ({e.filename or shown})", 0, started)
            return False
        except Exception as e:
            self.log.failure("purge {path!r} crashed", path=shown)
            self._record(shown, "failed", repr(e), 0, started)
            return False
        self._record(shown, done.outcome, "", done.files, started)
        return True

    def _record(self, path: str, outcome: str, reason: str, files: int, started: float) -> None:
        ms = (self.clock.seconds() - started) * 1000
        fmt = "purge {path!r} {outcome}" + (": {reason}" if reason else "") + ", {files} files, {ms:.1f} ms"
        emit = self.log.warn if outcome in ("refused", "failed") else self.log.info
        emit(fmt, path=path, outcome=outcome, reason=reason, files=files, ms=ms)

