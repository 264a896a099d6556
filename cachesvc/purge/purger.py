"""One purge request, start to finish: what it names, who deletes it, and the log line that records it.

A request is a path below a cache root, a URL (the cache files nginx would use for it), or a URL
ending in ``*`` (every cached key with that prefix). Purges of the same path share one operation,
and a purge below a path that is being purged waits for that purge first.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from cachesvc.purge.deleter import Deleted, IDeleter
from cachesvc.purge.nginxcache import PrefixScanner
from cachesvc.purge.paths import PathPolicy, PurgeTarget, Refused
from cachesvc.purge.ratelimit import LogBudget
from cachesvc.purge.zones import ZoneMap

URL_SCHEMES = (b"http://", b"https://")


class _Shared:
    """One operation that several requests wait on."""

    def __init__(self) -> None:
        self._waiters: list[Deferred[Any]] = []

    def observe(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._waiters.append(d)
        return d

    def settle(self, result: Any) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(result) if isinstance(result, Failure) else d.callback(result)


class Purger:
    """Turns request bytes into ``True`` (purged, or nothing was there) or ``False`` (refused, failed)."""

    log = Logger()

    def __init__(
        self,
        policy: PathPolicy,
        deleter: IDeleter,
        clock: IReactorTime,
        zones: ZoneMap | None = None,
        scanner: PrefixScanner | None = None,
    ) -> None:
        self.policy = policy
        self.deleter = deleter
        self.clock = clock
        self.zones = zones
        self.scanner = scanner
        self._inflight: dict[PurgeTarget, _Shared] = {}
        # Clients choose how many refusals there are (65,536 empty lines are 64 KiB): a burst, then counts.
        self._refused = LogBudget(self.log, clock, "purge requests refused")
        self._failed = LogBudget(self.log, clock, "purge requests failed")

    def purge(self, raw: bytes) -> Deferred[bool]:
        """Fire with whether the purge succeeded. Never fails: every error is logged and is ``False``.

        A request refused on its bytes alone (an empty line, a path outside the roots: what floods
        are made of) is answered at once, without a generator or a Failure.
        """
        started = self.clock.seconds()
        try:
            if raw.startswith(URL_SCHEMES):
                work: Deferred[tuple[str, str]] = self._purge_url(raw)
            else:
                work = self.delete(self.policy.target(raw)).addCallback(_described)
        except Refused as e:
            self._record(_shown(raw), "refused", f": {e}", started)
            return succeed(False)
        except Exception:
            return succeed(self._unsuccessful(Failure(), raw, started))
        return work.addCallbacks(
            self._successful, self._unsuccessful, callbackArgs=(raw, started), errbackArgs=(raw, started)
        )

    def _successful(self, done: tuple[str, str], raw: bytes, started: float) -> bool:
        outcome, detail = done
        self._record(_shown(raw), outcome, detail, started)
        return True

    def _unsuccessful(self, failure: Failure, raw: bytes, started: float) -> bool:
        shown, e = _shown(raw), failure.value
        if isinstance(e, Refused):
            self._record(shown, "refused", f": {e}", started)
        elif isinstance(e, OSError):
            self._record(shown, "failed", f": {e.strerror or e} ({e.filename or shown})", started)
        else:
            self.log.failure("purge {path!r} crashed", failure, path=shown)
            self._record(shown, "failed", f": {e!r}", started)
        return False

    def delete(self, target: PurgeTarget) -> Deferred[Deleted]:
        """Delete *target*, sharing an identical purge in flight and waiting for an ancestor's."""
        same = self._inflight.get(target)
        if same is not None:
            return same.observe()
        ancestors = [op.observe() for t, op in self._inflight.items() if t.contains(target)]
        op = self._inflight[target] = _Shared()
        start = DeferredList(ancestors, consumeErrors=True) if ancestors else succeed(None)
        start.addCallback(lambda _: self.deleter.delete(target))
        start.addBoth(self._settle, target, op)
        return op.observe()

    def _settle(self, result: Any, target: PurgeTarget, op: _Shared) -> None:
        del self._inflight[target]
        op.settle(result)

    @inlineCallbacks
    def _purge_url(self, raw: bytes) -> Generator[Deferred[Any], Any, tuple[str, str]]:
        try:
            url = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("URL is not valid UTF-8") from None
        if self.zones is None or not self.zones.zones:
            raise Refused("URL purges need purge.zones in the config")
        if url.endswith("*"):
            if self.scanner is None:
                raise Refused("prefix purges are not enabled")
            scanned = deleted = 0
            for zone, prefixes in self.zones.prefixes(url[:-1]):
                result = yield self.scanner.scan(zone, prefixes)
                scanned += result.scanned
                deleted += result.deleted
            return ("deleted" if deleted else "absent"), f", {deleted} of {scanned} files matched"
        outcomes = yield DeferredList([self.delete(t) for t in self.zones.files(url)], consumeErrors=True)
        files = 0
        for ok, value in outcomes:
            if not ok:
                value.raiseException()
            files += value.files or 0
        return ("deleted" if files else "absent"), f", {files} files"

    def _record(self, path: str, outcome: str, detail: str, started: float) -> None:
        ms = (self.clock.seconds() - started) * 1000
        line = "purge {path!r} {outcome}{detail}, {ms:.1f} ms"
        if outcome == "refused":
            self._refused.emit(LogLevel.warn, line, path=path, outcome=outcome, detail=detail, ms=ms)
        elif outcome == "failed":
            self._failed.emit(LogLevel.warn, line, path=path, outcome=outcome, detail=detail, ms=ms)
        else:
            self.log.info(line, path=path, outcome=outcome, detail=detail, ms=ms)


def _shown(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _described(done: Deleted) -> tuple[str, str]:
    return done.outcome, _files(done)


def _files(done: Deleted) -> str:
    if done.files is None:
        return " (moved to trash; deleting in the background)"
    return f", {done.files} files"
