"""The recache scheduler: due entries to Edge Gateways, within the render capacity online traffic leaves.

Each tick re-reads both registries (the keys the registry watcher knows, one MGET: never a SCAN of the
keyspace, see :mod:`cachesvc.recache.discovery`), returns expired leases to their queues, and
claims as much due work as the budget allows; every finished request triggers a refill, so the
Render Services stay at the capacity line between ticks instead of idling until the next one. The
online load the budget leaves room for is an estimate carried from claim to claim
(:mod:`cachesvc.recache.online`): a snapshot that misses requests still on their way to a gateway
(a slow machine, a lagging read) cannot lower it and let recache pass the line.
High-priority queues are considered on every claim; normal and autorecache at least every
``normal_check_interval`` and on every claim while due work is waiting there.

Each successful recache is logged at debug; once a minute, when anything was sent or dead-lettered,
one info line sums it up (sent, succeeded, failed, dead-lettered).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from cachesvc.metrics import Metrics
from cachesvc.recache.discovery import IRegistry
from cachesvc.recache.dispatch import GatewayPicker, IDispatcher, gateways_from_registry
from cachesvc.recache.gojson import GoJSONError
from cachesvc.recache.keys import PRIORITIES
from cachesvc.recache.ledger import Claim, Ledger
from cachesvc.recache.members import decode_member
from cachesvc.recache.online import OnlineEstimate
from cachesvc.recache.redisclient import RedisError, RedisUnavailable
from cachesvc.recache.registry import capacity_line, healthy_services
from cachesvc.recache.settings import RecacheSettings
from cachesvc.recache.state import SchedulerState
from cachesvc.recache.store import Store

SUMMARY_EVERY = 60.0
"""Seconds between the info lines that sum up the recache requests."""


class Scheduler(Service):
    log = Logger()
    name = "scheduler"

    def __init__(
        self,
        settings: RecacheSettings,
        store: Store,
        ledger: Ledger,
        dispatcher: IDispatcher,
        state: SchedulerState,
        reactor: Any,
        metrics: Metrics,
        registry: IRegistry,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.ledger = ledger
        self.dispatcher = dispatcher
        self.state = state
        self.reactor = reactor
        self.metrics = metrics
        self.gateways = GatewayPicker(settings.edge_gateways, reactor, settings.gateway_cooldown)
        self.host_ids = [h.id for h in settings.edge.hosts]
        self.loop = LoopingCall(self.tick)
        self.loop.clock = reactor
        self._inflight: dict[bytes, Deferred[None]] = {}
        self._claims: dict[bytes, Claim] = {}
        self._settling = 0
        self._line = 0
        self._load = 0
        self._snapshot = 0.0
        self.online = OnlineEstimate(reactor)
        self._busy = False
        self._queued: bool | None = None  # asked for while a cycle ran: None, False (refill), True (full)
        self._cycle_ended: Deferred[None] | None = None  # fires when the running cycle ends
        self._refill_pending = False
        self._rotation = 0
        self._normal_due_at = 0.0  # first normal check on the first tick
        self._normal_active = False
        self._outage: str | None = None
        self._stopping = False
        self.counts = dict.fromkeys(("sent", "succeeded", "failed", "dead_lettered"), 0)  # since the last summary
        self._summary = LoopingCall(self._summarise)
        self._summary.clock = reactor

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True from the moment stopService is called."""
        return self._stopping

    def startService(self) -> None:
        Service.startService(self)
        self.log.info("Starting Cache Daemon daemon_id={daemon_id} hosts={hosts} redis={redis}",
                      daemon_id=self.settings.daemon_id, hosts=len(self.settings.edge.hosts),
                      redis=self.settings.redis_addr)
        self.log.info("Scheduler started tick_interval={tick}s normal_check_interval={normal}s lease={lease}s",
                      tick=self.settings.tick_interval, normal=self.settings.normal_check_interval,
                      lease=self.settings.lease)
        self.loop.start(self.settings.tick_interval, now=False).addErrback(
            lambda f: self.log.failure("scheduler loop stopped", f))
        self._summary.start(SUMMARY_EVERY, now=False)

    def _summarise(self) -> None:
        counts = self.counts
        if counts["sent"] or counts["dead_lettered"]:
            self.log.info("recache requests in the last {every:g}s: sent={sent} succeeded={succeeded} failed={failed} "
                          "dead_lettered={dead_lettered}", every=SUMMARY_EVERY, **counts)
        self.counts = dict.fromkeys(counts, 0)

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        """Stop claiming, let in-flight requests finish for a while, then give the rest back at once."""
        self._stopping = True
        Service.stopService(self)
        if self.loop.running:
            self.loop.stop()
        if self._summary.running:
            self._summary.stop()
        if self._cycle_ended is not None:
            # A claim may be on its way back from Redis: wait for it (every Redis call is bounded), so
            # that what it claimed is released below, before the Redis pool closes.
            yield self._cycle_ended
        pending = list(self._inflight.values())
        if pending:
            self.log.info("waiting up to {grace}s for {n} in-flight recache requests",
                          grace=self.settings.shutdown_grace, n=len(pending))
            # Wait without cancelling: a cancelled request would take the retry path, not go back as it was.
            timer = deferLater(self.reactor, self.settings.shutdown_grace, lambda: None)
            yield DeferredList(
                [DeferredList(pending, consumeErrors=True), timer], fireOnOneCallback=True, consumeErrors=True
            )
            if not timer.called:
                timer.cancel()
        left = list(self._claims.values())  # still unanswered: their late answers will find the claim gone
        if left:
            results = yield DeferredList([self.ledger.settle(c, "release") for c in left], consumeErrors=True)
            released = sum(1 for ok, _ in results if ok)
            self.log.info("released {n} unfinished entries back to their queues", n=released)
        yield self.dispatcher.close()

    # --- the loop --------------------------------------------------------------------------------

    def tick(self) -> Deferred[None]:
        self.state.last_tick = self.reactor.seconds()
        if self.state.paused or self._stopping:
            return succeed(None)
        return self._cycle(full=True)

    def _refill(self) -> None:
        self._refill_pending = False
        if not self.state.paused and not self._stopping and self.running:
            self._cycle(full=False)

    def _schedule_refill(self) -> None:
        if not self._refill_pending:
            self._refill_pending = True
            self.reactor.callLater(0, self._refill)

    def _cycle(self, full: bool) -> Deferred[Any]:
        if self._busy:
            # Served by one more cycle when this one ends; a tick's full work (discovery, reaping,
            # queue depths) is never downgraded to a refill.
            self._queued = full or bool(self._queued)
            return succeed(None)
        self._busy = True
        self._cycle_ended = Deferred()
        d = self._claim_and_send(full)
        d.addCallbacks(self._redis_ok, self._redis_failed)
        d.addErrback(lambda f: self.log.failure("scheduler cycle failed", f))
        d.addBoth(self._cycle_done)
        return d

    def _cycle_done(self, _: Any) -> None:
        self._busy = False
        ended, self._cycle_ended = self._cycle_ended, None
        if ended is not None:
            ended.callback(None)
        queued, self._queued = self._queued, None
        if queued:
            self.reactor.callLater(0, self._queued_tick)
        elif queued is not None:
            self._schedule_refill()

    def _queued_tick(self) -> None:
        if not self.state.paused and not self._stopping and self.running:
            self._cycle(full=True)

    def _redis_ok(self, answered: bool) -> None:
        if answered and self._outage is not None:
            self.log.info("Redis answers again; scheduling resumed")
            self._outage = None

    def _redis_failed(self, failure: Any) -> None:
        failure.trap(RedisUnavailable, RedisError)
        if self._outage is None:
            self._outage = str(failure.value)
            self.log.error("Redis unavailable, scheduling paused until it answers: {reason}", reason=self._outage)

    @inlineCallbacks
    def _claim_and_send(self, full: bool) -> Generator[Deferred[Any], Any, bool]:
        """One cycle; fires with whether Redis answered anything in it (a sign it is back after an outage)."""
        if full:
            yield self._discover()
        if self._settling:
            # Answers still being recorded: the gateways are done with them while the ledger still
            # counts them, so a claim now would see less budget than there is. Each settle, once
            # recorded, asks for a refill.
            return full
        if not full:
            yield self._reread_render_services()
        if self.state.paused or self._stopping:
            return True  # paused (or stopping) while discovery ran: claim nothing
        if not self.gateways.usable or not self.host_ids:
            return True
        holding = self.online.holding  # claims wait, but the claim script still measures the estimate
        room = self.settings.max_size - len(self._inflight)
        if self._line <= 0 or (room <= 0 and not holding):
            return True
        now = self.reactor.seconds()
        normal = now >= self._normal_due_at or self._normal_active
        first = self._rotation % len(self.host_ids)
        hosts = self.host_ids[first:] + self.host_ids[:first]
        self._rotation += 1
        result = yield self.ledger.claim(self._line, self._load, self._snapshot, self.online.value,
                                         0 if holding else room, hosts, 3 if normal else 1)
        self.online.update(result.budget, self._line, len(self._claims))
        if holding and not self.online.holding:
            self._schedule_refill()
        if normal:
            self._normal_active = result.more_normal or any(c.priority != "high" for c in result.claims)
            if not self._normal_active:
                self._normal_due_at = now + self.settings.normal_check_interval
        for claim in result.claims:
            if self.stopping:  # the stop began while this claim was on its way: hand it back as it was
                self._claims[claim.id] = claim
            else:
                self._start(claim)
        return True

    @inlineCallbacks
    def _discover(self) -> Generator[Deferred[Any], Any, None]:
        gateways, render_services = yield self.registry.refresh()
        self.gateways.update(gateways_from_registry(gateways))
        self._use_render_services(render_services)
        reaped = yield self.ledger.reap()
        if reaped:
            self.log.warn("returned {n} entries whose lease expired (a daemon stopped mid-request) to their queues",
                          n=reaped)
        counts = yield self.store.queue_counts(self.host_ids, int(self.reactor.seconds()))
        for priority in PRIORITIES:
            self.metrics.queue_depth.labels(priority).set(sum(c[priority].total for c in counts.values()))

    @inlineCallbacks
    def _reread_render_services(self) -> Generator[Deferred[Any], Any, None]:
        self._use_render_services((yield self.registry.render_services()))

    def _use_render_services(self, values: list[bytes]) -> None:
        services = healthy_services(values, self.reactor.seconds())
        self._line = capacity_line(services, self.settings.rs_capacity_reserved)
        self._load = sum(s.load for s in services)
        self._snapshot = min((s.last_seen for s in services), default=self.reactor.seconds())

    # --- one entry -------------------------------------------------------------------------------

    def _start(self, claim: Claim) -> None:
        self._claims[claim.id] = claim
        self.state.in_flight[claim.host_id] = self.state.in_flight.get(claim.host_id, 0) + 1
        self.metrics.in_flight.set(len(self._claims))
        d = self._inflight[claim.id] = self._process(claim)  # before _finished, which may run at once
        d.addErrback(lambda f: self.log.failure("processing {id!r} failed", f, id=claim.id))
        d.addBoth(self._finished, claim)

    def _finished(self, _: Any, claim: Claim) -> None:
        self._inflight.pop(claim.id, None)
        self._claims.pop(claim.id, None)
        self.state.in_flight[claim.host_id] -= 1
        self.metrics.in_flight.set(len(self._claims))
        self._schedule_refill()

    @inlineCallbacks
    def _settle(self, claim: Claim, action: str, *args: Any, **kwargs: Any) -> Generator[Deferred[Any], Any, str]:
        self._settling += 1
        try:
            outcome: str = yield self.ledger.settle(claim, action, *args, **kwargs)
            return outcome
        finally:
            self._settling -= 1

    @inlineCallbacks
    def _process(self, claim: Claim) -> Generator[Deferred[Any], Any, None]:
        try:
            member = decode_member(claim.member)
        except GoJSONError as e:
            self.log.error("Failed to unmarshal RecacheMember {member!r}: {e}; quarantined in the dead-letter set",
                           member=claim.member, e=str(e))
            self.metrics.dead_letters.labels("undecodable").inc()
            self.counts["dead_lettered"] += 1
            yield self._settle(claim, "dead", reason=f"undecodable member: {e}", failed_at=int(self.reactor.seconds()))
            return
        gateway = self.gateways.pick()
        if gateway is None:  # every gateway went to rest since the claim: give it back untouched
            yield self._settle(claim, "release")
            return
        started = self.reactor.seconds()
        self.counts["sent"] += 1
        try:
            status = yield self.dispatcher.send(gateway, member.url, claim.host_id, member.dimension_id)
        except Exception as e:
            status, error = None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            self.gateways.rest(gateway)
        else:
            error = f"HTTP {status}"
        self.metrics.recache_duration.observe(self.reactor.seconds() - started)
        outcome = "success" if status == 200 else "client_error" if status and 400 <= status < 500 else "failure"
        self.metrics.eg_requests.labels(gateway.id, outcome).inc()
        self.metrics.recache_requests.labels(outcome, claim.priority).inc()
        if status == 200:
            self.counts["succeeded"] += 1
            self.log.debug("Recache succeeded url={url!r} host_id={host} dimension_id={dim} eg={eg} in {ms:.0f} ms",
                           url=member.url, host=claim.host_id, dim=member.dimension_id, eg=gateway.id,
                           ms=(self.reactor.seconds() - started) * 1000)
            yield self._settle(claim, "ack")
            return
        self.counts["failed"] += 1
        now = int(self.reactor.seconds())
        if outcome == "client_error":
            self.log.error("Recache rejected by {eg} ({error}), dead-lettered url={url!r} host_id={host} "
                           "dimension_id={dim}",
                           eg=gateway.id, error=error, url=member.url, host=claim.host_id, dim=member.dimension_id)
            self.metrics.dead_letters.labels("rejected").inc()
            self.counts["dead_lettered"] += 1
            yield self._settle(claim, "dead", reason=f"{gateway.id} answered {error}", failed_at=now)
            return
        result = yield self._settle(claim, "retry", self.settings.retry_base_delay, self.settings.max_retries,
                                          reason=f"failed after {self.settings.max_retries} attempts, "
                                                 f"last: {error} from {gateway.id}",
                                          failed_at=now)
        if result == "dead":
            self.metrics.dead_letters.labels("exhausted").inc()
            self.counts["dead_lettered"] += 1
            self.log.error("Recache failed after max retries, dead-lettered url={url!r} host_id={host} error={error}",
                           url=member.url, host=claim.host_id, error=error)
