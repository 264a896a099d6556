"""One purge request, start to finish: what it names, what is done to it, and the log line that records it.

A request is a path below a cache root, a URL (the cache files nginx would use for it), or a URL
ending in ``*`` (every cached key with that prefix), optionally after ``soft:`` or ``hard:``. A
hard purge deletes; a soft one marks the entries expired (nginx serves them ``STALE`` while it
refreshes them). Without a prefix the zone's mode applies, else ``purge.mode``. Purges of the
same path and mode share one operation, and a purge below a path that is being purged waits for
that purge first. With warming on, what a purge removed or marked is requested again afterwards.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from cachesvc.purge.deleter import Deleted, IDeleter
from cachesvc.purge.harvest import Gathering, Harvest
from cachesvc.purge.keyurl import url_maker
from cachesvc.purge.nginxcache import PrefixScanner, ScanResult
from cachesvc.purge.paths import PathPolicy, PurgeTarget, Refused
from cachesvc.purge.ratelimit import LogBudget
from cachesvc.purge.tags import MAX_TAG_BYTES, MAX_TAGS
from cachesvc.purge.tagwatch import TagIndex
from cachesvc.purge.zones import Zone, ZoneMap

URL_SCHEMES = (b"http://", b"https://")
TAG_PREFIX = b"tag:"
_TAG_SEPARATORS = re.compile(rb"[ ,\t]+")
MODE_PREFIXES = ((b"soft:", "soft"), (b"hard:", "hard"))

Warm = Callable[[str, list[str], int], None]
"""Warms the URLs a purge removed or marked: (the purge as received, URLs newest first, entries left out)."""


@dataclass(frozen=True)
class Done:
    """What a purge did: the outcome word, the detail for its log line, and the entries it purged."""

    outcome: str
    detail: str
    entries: int = 0


@dataclass(frozen=True)
class Purged:
    """One purge's record for observers: its form (path, url, prefix, tag), mode, outcome and time."""

    form: str
    mode: str
    outcome: str  # deleted, marked, absent, refused, failed
    seconds: float
    entries: int


def split_mode(raw: bytes) -> tuple[str | None, bytes]:
    """``soft:…``/``hard:…`` → the mode and the rest; anything else → ``None`` and the line as it is."""
    for prefix, mode in MODE_PREFIXES:
        if raw.startswith(prefix):
            return mode, raw[len(prefix) :]
    return None, raw


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
        mode: str = "hard",
        warm: Warm | None = None,
        warm_limit: int = 10000,
        reactor: Any = None,
        tags: TagIndex | None = None,
    ) -> None:
        self.policy = policy
        self.deleter = deleter
        self.clock = clock
        self.zones = zones
        self.scanner = scanner
        self.mode = mode
        self.warm = warm
        self.warm_limit = warm_limit
        self.tags = tags
        self.observers: list[Callable[[Purged], None]] = []  # e.g. metrics, called with every purge's outcome
        self.log = self.log  # bound once: each access to the class's Logger builds a new one (a purge logs a line)
        self._reactor = reactor if reactor is not None else clock
        self._makers: dict[Zone, Callable[[str], str | None] | None] = {}
        self.set_zones(zones)
        self._inflight: dict[tuple[str, PurgeTarget], _Shared] = {}
        # Clients choose how many refusals there are (65,536 empty lines are 64 KiB): a burst, then counts.
        self._refused = LogBudget(self.log, clock, "purge requests refused")
        self._failed = LogBudget(self.log, clock, "purge requests failed")

    def set_zones(self, zones: ZoneMap | None) -> None:
        """Use *zones* from now on (purges under way keep the ones they started with)."""
        self.zones = zones
        self._makers = {zone: url_maker(zone.key) for zone in zones.zones} if zones is not None else {}

    def purge(self, raw: bytes) -> Deferred[bool]:
        """Fire with whether the purge succeeded. Never fails: every error is logged and is ``False``.

        A request refused on its bytes alone (an empty line, a path outside the roots: what floods
        are made of) is answered at once, without a generator or a Failure.
        """
        started = self.clock.seconds()
        gathering = self._gathering(raw)
        try:
            mode, line = split_mode(raw)
            if line.startswith(URL_SCHEMES):
                work: Deferred[Done] = self._purge_url(line, mode, gathering)
            elif line.startswith(TAG_PREFIX):
                work = self._purge_tags(line[len(TAG_PREFIX) :], mode, gathering)
            else:
                work = self._purge_path(self.policy.target(line), mode, gathering)
        except Refused as e:
            self._record(_shown(raw), "refused", f": {e}", started, raw)
            return succeed(False)
        except Exception:
            return succeed(self._unsuccessful(Failure(), raw, started))
        if gathering is not None:
            work.addBoth(_passing(gathering.seal))
        return work.addCallbacks(
            self._successful, self._unsuccessful, callbackArgs=(raw, started), errbackArgs=(raw, started)
        )

    def _successful(self, done: Done, raw: bytes, started: float) -> bool:
        self._record(_shown(raw), done.outcome, done.detail, started, raw, done.entries)
        return True

    def _unsuccessful(self, failure: Failure, raw: bytes, started: float) -> bool:
        shown, e = _shown(raw), failure.value
        if isinstance(e, Refused):
            self._record(shown, "refused", f": {e}", started, raw)
        elif isinstance(e, OSError):
            self._record(shown, "failed", f": {e.strerror or e} ({e.filename or shown})", started, raw)
        else:
            self.log.failure("purge {path!r} crashed", failure, path=shown)
            self._record(shown, "failed", f": {e!r}", started, raw)
        return False

    # --- paths ------------------------------------------------------------------------------------

    def _purge_path(
        self, target: PurgeTarget, mode: str | None, gathering: Gathering | None
    ) -> Deferred[Done]:
        zone = self.zones.zone_of(target) if self.zones is not None else None
        mode = mode or (zone.mode if zone is not None else self.mode)
        harvest = self._harvest(gathering, zone)
        if mode == "soft":
            return self.soften(target, harvest).addCallback(_described_walk)
        return self.delete(target, harvest).addCallback(_described)

    def delete(self, target: PurgeTarget, harvest: Harvest | None = None) -> Deferred[Deleted]:
        """Delete *target*, sharing an identical purge in flight and waiting for an ancestor's."""
        return self._shared(("hard", target), harvest, lambda: self.deleter.delete(target, harvest))

    def soften(self, target: PurgeTarget, harvest: Harvest | None = None) -> Deferred[ScanResult]:
        """Mark every cache entry at or below *target* expired (and delete what is not a cache file)."""
        scanner = self.scanner
        if scanner is None:
            raise Refused("soft purges are not enabled")
        walk = functools.partial(scanner.scan, target, None, "soft", harvest)
        return self._shared(("soft", target), harvest, lambda: _finishing(walk(), harvest))

    def _shared(
        self, key: tuple[str, PurgeTarget], harvest: Harvest | None, start: Callable[[], Deferred[Any]]
    ) -> Deferred[Any]:
        target = key[1]
        same = self._inflight.get(key)
        if same is not None:
            if harvest is not None:
                harvest.finish()  # the purge in flight warms what it purges
            return same.observe()
        inflight = self._inflight
        ancestors = [op.observe() for (_, t), op in inflight.items() if t.contains(target)] if inflight else None
        op = inflight[key] = _Shared()
        observed = op.observe()  # before the work starts: it may finish at once
        if ancestors:
            ready: Deferred[Any] = DeferredList(ancestors, consumeErrors=True)
            ready.addCallback(lambda _: start())
        else:
            ready = maybeDeferred(start)
        if harvest is not None:
            ready.addErrback(_passing(harvest.finish))  # a failed purge warms what it managed to record
        ready.addBoth(self._settle, key, op)
        return observed

    def _settle(self, result: Any, key: tuple[str, PurgeTarget], op: _Shared) -> None:
        del self._inflight[key]
        op.settle(result)

    # --- URLs -------------------------------------------------------------------------------------

    @inlineCallbacks
    def _purge_url(
        self, raw: bytes, mode: str | None, gathering: Gathering | None
    ) -> Generator[Deferred[Any], Any, Done]:
        try:
            url = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("URL is not valid UTF-8") from None
        if self.zones is None or not self.zones.zones:
            raise Refused("URL purges need purge.zones in the config")
        if url.endswith("*"):
            scanner = self.scanner
            if scanner is None:
                raise Refused("prefix purges are not enabled")
            total = ScanResult()
            for zone, directory, prefixes in self.zones.prefixes_by_zone(url[:-1]):
                harvest = self._harvest(gathering, zone)
                result = yield _finishing(scanner.scan(directory, prefixes, mode or zone.mode, harvest), harvest)
                total.scanned += result.scanned
                total.deleted += result.deleted
                total.marked += result.marked
            return Done(_outcome(total), _matched(total), total.deleted + total.marked)
        work: list[Deferred[Any]] = []
        for zone, targets in self.zones.files_by_zone(url):
            soft = (mode or zone.mode) == "soft"
            for target in targets:
                harvest = self._harvest(gathering, zone)
                work.append(self.soften(target, harvest) if soft else self.delete(target, harvest))
        outcomes = yield DeferredList(work, consumeErrors=True)
        total = ScanResult()
        for ok, value in outcomes:
            if not ok:
                value.raiseException()
            if isinstance(value, ScanResult):
                total.deleted += value.deleted
                total.marked += value.marked
            else:
                total.deleted += value.files or 0
        return Done(_outcome(total), f", {_counts(total)}", total.deleted + total.marked)

    # --- tags -------------------------------------------------------------------------------------

    @inlineCallbacks
    def _purge_tags(
        self, rest: bytes, mode: str | None, gathering: Gathering | None
    ) -> Generator[Deferred[Any], Any, Done]:
        index, scanner = self.tags, self.scanner
        if index is None or scanner is None:
            raise Refused("tag purges need purge.tags.enabled: true in the config")
        scope_raw, space, listed = rest.partition(b" ")
        if not space:
            raise Refused("a tag purge is tag:<scope> <tag>[,<tag>...]")
        scope = self.policy.target(scope_raw)
        tags = parse_tag_list(listed)
        zone = self.zones.zone_of(scope) if self.zones is not None else None
        mode = mode or (zone.mode if zone is not None else self.mode)
        harvest = self._harvest(gathering, zone)
        try:
            result = yield index.purge(scope, tags, mode, harvest)
            how = "the index"
            if result is None:
                result = yield scanner.scan(scope, None, mode, harvest, tags, index.headers)
                how = "a scan (the index is not ready)"
        finally:
            if harvest is not None:
                harvest.finish()
        purged = f"{result.marked} marked expired" if mode == "soft" else f"{result.deleted} deleted"
        detail = f", {purged} of {result.scanned} candidates, answered by {how}"
        return Done(_outcome(result), detail, result.deleted + result.marked)

    # --- warming ----------------------------------------------------------------------------------

    def _gathering(self, raw: bytes) -> Gathering | None:
        warm = self.warm
        if warm is None or not any(self._makers.values()):
            return None
        label = _shown(raw)
        return Gathering(self.warm_limit, self._reactor, lambda urls, skipped: _warm_if_any(warm, label, urls, skipped))

    def _harvest(self, gathering: Gathering | None, zone: Zone | None) -> Harvest | None:
        maker = self._makers.get(zone) if zone is not None else None
        if gathering is None or maker is None:
            return None
        return gathering.harvest(maker)

    def _kind(self, raw: bytes) -> tuple[str, str]:
        """(form, mode) of a request line, for metrics: path, url, prefix or tag; hard or soft."""
        mode, line = split_mode(raw)
        if line.startswith(URL_SCHEMES):
            form = "prefix" if line.endswith(b"*") else "url"
        else:
            form = "tag" if line.startswith(TAG_PREFIX) else "path"
        return form, mode or self.mode

    def _record(
        self, path: str, outcome: str, detail: str, started: float, raw: bytes = b"", entries: int = 0
    ) -> None:
        seconds = self.clock.seconds() - started
        ms = seconds * 1000
        for observe in self.observers:
            observe(Purged(*self._kind(raw), outcome, seconds, entries))
        line = "purge {path!r} {outcome}{detail}, {ms:.1f} ms"
        if outcome == "refused":
            self._refused.emit(LogLevel.warn, line, path=path, outcome=outcome, detail=detail, ms=ms)
        elif outcome == "failed":
            self._failed.emit(LogLevel.warn, line, path=path, outcome=outcome, detail=detail, ms=ms)
        else:
            self.log.info(line, path=path, outcome=outcome, detail=detail, ms=ms)


def parse_tag_list(listed: bytes) -> frozenset[str]:
    """``post-42,home term-7`` → the tags; :class:`Refused` for none, too many or too long."""
    raw = [t for t in _TAG_SEPARATORS.split(listed.strip()) if t]
    if not raw:
        raise Refused("no tags after the scope; a tag purge is tag:<scope> <tag>[,<tag>...]")
    if len(raw) > MAX_TAGS:
        raise Refused(f"more than {MAX_TAGS} tags in one purge")
    if any(len(t) > MAX_TAG_BYTES for t in raw):
        raise Refused(f"a tag longer than {MAX_TAG_BYTES} bytes")
    return frozenset(t.decode("utf-8", "surrogateescape") for t in raw)


def _passing(call: Callable[[], None]) -> Callable[[Any], Any]:
    """A callback that calls *call* and passes the result (or the Failure) on unchanged."""

    def passing(result: Any) -> Any:
        call()
        return result

    return passing


def _finishing(d: Deferred[ScanResult], harvest: Harvest | None) -> Deferred[ScanResult]:
    """*d*, finishing *harvest* once the walk that records into it is over, whatever its result."""
    return d if harvest is None else d.addBoth(_passing(harvest.finish))


def _warm_if_any(warm: Warm, label: str, urls: list[str], skipped: int) -> None:
    if urls or skipped:
        warm(label, urls, skipped)


def _shown(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _described(done: Deleted) -> Done:
    return Done(done.outcome, _files(done), done.files or 0)


def _described_walk(done: ScanResult) -> Done:
    return Done(_outcome(done), f", {_counts(done)}", done.deleted + done.marked)


def _outcome(done: ScanResult) -> str:
    return "marked" if done.marked else "deleted" if done.deleted else "absent"


def _counts(done: ScanResult) -> str:
    if not done.marked:
        return f"{done.deleted} files"
    return f"{done.marked} entries marked expired, {done.deleted} other files deleted"


def _matched(done: ScanResult) -> str:
    if not done.marked:
        return f", {done.deleted} of {done.scanned} files matched"
    return f", {_counts(done)} of {done.scanned} files scanned"


def _files(done: Deleted) -> str:
    if done.files is None:
        return " (moved to trash; deleting in the background)"
    return f", {done.files} files"
