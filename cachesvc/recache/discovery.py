"""The registry watcher: which Edge Gateways and Render Services are registered, at a bounded cost.

EdgeComet keeps one ``meta:cache:*`` key per cached page in the Redis that holds the registries,
and a SCAN walks the whole keyspace whatever its MATCH: one full pass over 1M keys costs Redis
about 0.75 s of CPU (``specs/redis-discovery.md``). So the keyspace is never scanned per tick:

- **notifications** where the server has them (``notify-keyspace-events`` is read, and ``K$gx``
  added to what is there, never removing a flag; a server that refuses CONFIG is probed with a
  short-lived key): a connection of its own PSUBSCRIBEs to the keyspace channels of
  ``registry:eg:*`` and ``service:render:*``, so a key that is written is known at once. Pub/sub
  loses what happens while disconnected, so after every (re)connect one full pass runs; a very slow
  background pass (one every ``sweep_period``) is the safety net.
- **scan** where it has not (CONFIG refused and no notification seen, or the link down): an
  incremental SCAN cursor, a bounded COUNT per step, paced so that a pass takes ``scan_period``.

Either way the known keys are re-read with one MGET per read (:meth:`Discovery.refresh` on every
tick, :meth:`Discovery.render_services` on refills and for ``/status``): a missing key is a service
that left. The mode is logged when it changes and shown in ``/status`` (``daemon.discovery``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Generator, Sequence
from typing import Any, NamedTuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Interface, implementer

from cachesvc.recache import keys
from cachesvc.recache.pubsub import NEEDED_FLAGS, IPubSub, IPubSubLink, Probe, ensure_flags, missing_flags
from cachesvc.recache.redisclient import RedisError, RedisUnavailable
from cachesvc.recache.store import Store

NOTIFICATIONS, SCAN = "notifications", "scan"
REMOVALS = frozenset({b"del", b"expired", b"evicted", b"rename_from"})

SCAN_PERIOD = 8.0  # seconds a whole pass takes without notifications: a newcomer is found within it
SWEEP_PERIOD = 600.0  # seconds a whole pass takes with notifications (the safety net)
STEP = 1.0  # a paced pass takes about one step a second (fewer for a small keyspace, more for a big one)...
MIN_STEP = 0.04  # ...but never more than 25 a second
MIN_COUNT, MAX_COUNT = 100, 5000  # keys one SCAN step looks at (5,000: ~4 ms of Redis time)
FAST_COUNT = 5000  # a full pass after a (re)connect: steps back to back
RESIZE_EVERY = 10.0  # seconds between two DBSIZE reads (what paces the steps)
CHECK_INTERVAL = 10.0  # PING the subscriber and re-read notify-keyspace-events
RECHECK_INTERVAL = 60.0  # without notifications: try to have them again
MAX_BACKOFF = 5.0  # between pub/sub connection attempts
STABLE = 10.0  # a link that lived this long resets the backoff
FIRST_PASS_WAIT = 1.0  # render_services waits this long at most for the first full pass


class Registrations(NamedTuple):
    gateways: list[bytes]  # values of the registry:eg:* keys that exist, by key
    render_services: list[bytes]  # values of the service:render:* keys that exist, by key


class IRegistry(Interface):
    """The registries as the scheduler and ``/status`` read them: the seam their tests swap."""

    def refresh() -> Deferred[Registrations]:
        """Every known registry key re-read (one MGET); waits for the first full discovery."""

    def render_services(catch_up: bool = False) -> Deferred[list[bytes]]:
        """The known Render Service keys re-read (one MGET), waiting a moment at most for the first full
        discovery; *catch_up*: first take in every notification published before now."""

    def describe() -> dict[str, Any]:
        """How discovery runs, for ``/status``: ``mode`` first."""


class _NoNotifications(Exception):
    """The server will not announce registry writes (flags refused, or the probe went unheard)."""


_EG = keys.EG_PREFIX.encode()
_RS = keys.RS_PREFIX.encode()
_PROBE = keys.PROBE_PREFIX.encode()


@implementer(IRegistry)
class Discovery(Service):
    log = Logger()
    name = "discovery"

    def __init__(self, store: Store, pubsub: IPubSub, db: int, clock: Any, timeout: float = 3.0,
                 scan_period: float = SCAN_PERIOD, sweep_period: float = SWEEP_PERIOD) -> None:
        self.store = store
        self.pubsub = pubsub
        self.clock = clock
        self.timeout = timeout
        self.scan_period = scan_period
        self.sweep_period = sweep_period
        self.mode, self.detail = SCAN, "starting"
        self.full_passes = 0  # completed passes over the whole keyspace
        self.subscriptions = 0  # times the keyspace channels were (re)subscribed
        self._prefix = keys.keyspace_channel(db, "").encode()
        self._channels = [keys.keyspace_channel(db, p) for p in (keys.EG_REGISTRY, keys.RS_REGISTRY,
                                                                 keys.PROBE_PREFIX + "*")]
        self._known: dict[bytes, int] = {}  # key -> generation at which it was last seen
        self._generation, self._synced = 0, False  # synced: a first full pass ended
        self._waiters: list[Deferred[None]] = []
        self._error: str | None = None  # why the last scan step failed
        self._cursor, self._pass, self._fast, self._stepping = b"0", 0, False, False
        self._step_call: IDelayedCall | None = None
        self._dbsize, self._sized_at = 0, -math.inf
        self._link: IPubSubLink | None = None
        self._linked_at, self._backoff, self._config_usable = 0.0, 1.0, False
        self._attempt: IDelayedCall | None = None
        self._probe = Probe()
        self._checks = LoopingCall(self._check)
        self._checks.clock = clock

    # --- lifecycle -------------------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._begin_pass(fast=True)  # begun again once subscribed; meanwhile readers need not wait for a probe
        self._subscribe()
        self._checks.start(CHECK_INTERVAL, now=False).addErrback(
            lambda f: self.log.failure("registry discovery checks stopped", f))

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        for call in (self._step_call, self._attempt):
            if call is not None and call.active():
                call.cancel()
        if self._checks.running:
            self._checks.stop()
        self._release(RedisUnavailable("registry discovery stopped"))
        link, self._link = self._link, None
        return link.close() if link is not None else succeed(None)

    # --- what readers call -----------------------------------------------------------------------

    @inlineCallbacks
    def refresh(self) -> Generator[Deferred[Any], Any, Registrations]:
        yield self._when_synced()
        found = yield self._read(list(self._known))
        return Registrations([v for k, v in found if k.startswith(_EG)], [v for k, v in found if k.startswith(_RS)])

    @inlineCallbacks
    def render_services(self, catch_up: bool = False) -> Generator[Deferred[Any], Any, list[bytes]]:
        if not self._synced:  # just started: give the first pass a moment, but no more
            waited = self._when_synced()
            waited.addTimeout(FIRST_PASS_WAIT, self.clock)
            with contextlib.suppress(TimeoutError):
                yield waited
        link = self._link
        if catch_up and link is not None:
            # The PONG comes after every message published before the PING reached Redis. A link that
            # does not answer is dropped (and reconnected): answer with what is known.
            with contextlib.suppress(RedisUnavailable):
                yield link.ping()
        found = yield self._read([k for k in self._known if k.startswith(_RS)])
        return [v for _, v in found]

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "detail": self.detail, "synced": self._synced,
                "gateway_keys": sum(1 for k in self._known if k.startswith(_EG)),
                "render_service_keys": sum(1 for k in self._known if k.startswith(_RS)),
                "full_passes": self.full_passes, "subscriptions": self.subscriptions}

    def _when_synced(self) -> Deferred[None]:
        if self._synced:
            return succeed(None)
        if self._error is not None:
            return fail(RedisUnavailable(self._error))
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def _release(self, error: Exception | None = None) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if error is None:
                d.callback(None)
            else:
                d.errback(error)

    @inlineCallbacks
    def _read(self, names: list[bytes]) -> Generator[Deferred[Any], Any, list[tuple[bytes, bytes]]]:
        """``[(key, value)]`` of the *names* that exist, by key; a missing one is forgotten.

        Unless it was seen again after the MGET was sent: its notification travels on another
        connection and may overtake the MGET's answer.
        """
        names.sort()
        asked = self._generation
        values: Sequence[bytes | None] = yield self.store.read_keys(names)
        found = []
        for name, value in zip(names, values, strict=True):
            if value is not None:
                if value:  # EdgeComet skips an empty value
                    found.append((name, value))
            elif self._known.get(name, math.inf) <= asked:
                self._forget(name)
        return found

    def _saw(self, key: bytes) -> None:
        self._generation += 1
        if key not in self._known:
            self.log.info("registry key {key} appeared", key=key.decode(errors="replace"))
        self._known[key] = self._generation

    def _forget(self, key: bytes) -> None:
        self._generation += 1
        if self._known.pop(key, None) is not None:
            self.log.info("registry key {key} is gone", key=key.decode(errors="replace"))

    def _message(self, channel: bytes, event: bytes) -> None:
        if not channel.startswith(self._prefix):
            return
        key = channel[len(self._prefix):]
        if key.startswith(_PROBE):
            self._probe.heard(key)
        elif key.startswith(_EG) or key.startswith(_RS):
            if event in REMOVALS:
                self._forget(key)
            else:
                self._saw(key)

    # --- scanning --------------------------------------------------------------------------------

    def _begin_pass(self, fast: bool) -> None:
        """A pass over the whole keyspace from its start: step after step (*fast*), or paced."""
        self._cursor, self._pass, self._fast = b"0", self._pass + 1, fast
        self._schedule_step(0)

    def _schedule_step(self, delay: float) -> None:
        if self._step_call is not None and self._step_call.active():
            self._step_call.cancel()
        self._step_call = self.clock.callLater(delay, self._step) if self.running else None

    def _pace(self) -> tuple[int, float]:
        """(COUNT, seconds to the next step) so that a pass takes the mode's period."""
        if self._fast:
            return FAST_COUNT, 0.0
        period = self.sweep_period if self.mode == NOTIFICATIONS else self.scan_period
        count = min(MAX_COUNT, max(MIN_COUNT, math.ceil(self._dbsize * STEP / period)))
        return count, max(MIN_STEP, period / max(1, math.ceil(self._dbsize / count)))

    @inlineCallbacks
    def _step(self) -> Generator[Deferred[Any], Any, None]:
        self._step_call = None
        if self._stepping or not self.running:
            return  # the step in flight schedules the next one
        self._stepping, started = True, self._pass
        try:
            if self.clock.seconds() - self._sized_at >= RESIZE_EVERY:
                self._dbsize = yield self.store.key_count()
                self._sized_at = self.clock.seconds()
            count, delay = self._pace()
            cursor, found = yield self.store.scan_registries(self._cursor, count)
        except (RedisUnavailable, RedisError) as e:
            delay = 1.0
            if self._error is None:
                self.log.warn("registry discovery: {reason}; retrying", reason=str(e))
            self._error = str(e)
            if not self._synced:
                self._release(RedisUnavailable(self._error))
        except Exception:
            delay = 1.0
            self.log.failure("registry discovery step failed")
        else:
            self._error = None
            for key in found:
                if key not in self._known:
                    self._saw(key)
            if started != self._pass:
                delay = 0  # a new pass began meanwhile
            else:
                self._cursor = cursor
                if cursor in (b"0", "0", 0):
                    self._pass_done()
                    delay = self._pace()[1]
        finally:
            self._stepping = False
        self._schedule_step(delay)

    def _pass_done(self) -> None:
        self.full_passes += 1
        self._fast = False
        self._pass += 1
        if not self._synced:
            self._synced = True
            self.log.info("registry discovery: first full pass done, {eg} gateway and {rs} render service keys",
                          eg=sum(1 for k in self._known if k.startswith(_EG)),
                          rs=sum(1 for k in self._known if k.startswith(_RS)))
        self._release()

    # --- notifications ---------------------------------------------------------------------------

    def _subscribe(self) -> None:
        self._attempt = None
        if self.running:
            self._session().addErrback(lambda f: self.log.failure("registry discovery: subscribing failed", f))

    @inlineCallbacks
    def _session(self) -> Generator[Deferred[Any], Any, None]:
        link = None
        try:
            link = yield self.pubsub.connect(self._message)
            ready, detail = yield ensure_flags(self.store)
            self._config_usable = ready is not None
            if ready is False:
                raise _NoNotifications(detail)
            yield link.psubscribe(self._channels)
            if ready is None:
                if not (yield self._probe.run(self.store, self.clock, self.timeout)):
                    raise _NoNotifications(f"{detail}, and a probe key's notification did not arrive")
                detail += ", yet a probe key's notification arrived"
        except _NoNotifications as e:
            self._drop(link)
            self._use_scan(str(e), retry=RECHECK_INTERVAL)
            return
        except Exception as e:  # RedisUnavailable, RedisError, or a surprise: either way, try again later
            if not isinstance(e, (RedisUnavailable, RedisError)):
                self.log.failure("registry discovery: subscribing failed")
            self._drop(link)
            self._use_scan(f"no pub/sub connection ({e})", retry=self._next_backoff())
            return
        if not self.running:
            self._drop(link)
            return
        self._link, self._linked_at = link, self.clock.seconds()
        self.subscriptions += 1
        link.lost.addCallback(self._lost, link)
        if self._link is link:  # not lost already
            self._set_mode(NOTIFICATIONS, detail)
            self._begin_pass(fast=True)  # what was written while nobody listened

    @staticmethod
    def _drop(link: IPubSubLink | None) -> None:
        if link is not None:
            link.close()

    def _next_backoff(self) -> float:
        delay, self._backoff = self._backoff, min(MAX_BACKOFF, self._backoff * 2)
        return delay

    def _lost(self, _: Any, link: IPubSubLink) -> None:
        if self._link is not link:
            return
        self._link = None
        if self.clock.seconds() - self._linked_at >= STABLE:
            self._backoff = 1.0
        if self.running:
            self._use_scan("the pub/sub connection was lost; reconnecting", retry=self._next_backoff())

    def _use_scan(self, reason: str, retry: float) -> None:
        was = self.mode
        self._set_mode(SCAN, reason)
        if was != SCAN and not self._fast:
            self._begin_pass(fast=False)  # a newcomer is found within one scan period from now on
        if self.running and (self._attempt is None or not self._attempt.active()):
            self._attempt = self.clock.callLater(retry, self._subscribe)

    def _set_mode(self, mode: str, detail: str) -> None:
        if (mode, detail) != (self.mode, self.detail):
            if mode == NOTIFICATIONS:
                self.log.info("registry discovery by keyspace notifications ({detail})", detail=detail)
            else:
                self.log.warn("registry discovery by incremental SCAN, a full pass every {period:g}s: {detail}",
                              period=self.scan_period, detail=detail)
        self.mode, self.detail = mode, detail

    @inlineCallbacks
    def _check(self) -> Generator[Deferred[Any], Any, None]:
        """The link answers, and the flags are still there (another client may change them)."""
        link = self._link
        if link is None:
            return
        try:
            yield link.ping()
            current = (yield self.store.notify_flags()) if self._config_usable else None
        except RedisUnavailable as e:
            if self._link is link:
                self.log.warn("registry discovery: {reason}; reconnecting", reason=str(e))
                link.close()
            return
        except RedisError:
            return  # CONFIG refused since: the flags cannot be checked; the link itself answered
        except Exception:
            self.log.failure("registry discovery check failed")  # caught: a LoopingCall stops on a failure
            return
        if current is not None and missing_flags(current, NEEDED_FLAGS) and self._link is link:
            self.log.warn("notify-keyspace-events became {current!r}: registry writes go unannounced; resubscribing",
                          current=current)
            link.close()  # the reconnect adds the flags back and runs a full pass
