"""Cluster purges: daemons that share one Redis apply every purge line any of them receives.

The receiving node purges locally and appends the line to a Redis Stream; every other node reads
the stream, applies the line with its OWN path policy and zones (an entry written into Redis by
anyone is just another untrusted line), and appends its outcome to an acknowledgement stream. The
receiving node answers ``Purge: Success`` only if its own purge succeeded and every live node
acknowledged success within ``wait``. Each node keeps the id of the last entry it applied, applies
what it missed before it serves purges (after a restart or a Redis outage), and purges all its
zones once, hard, when what it missed has been trimmed away.

Redis keys, named after ``purge.cluster.stream`` (``S``): ``S`` (fields ``node``, ``line``),
``S:acks`` (``id``, ``node``, ``ok``), ``S:members`` (a set of node names), ``S:node:<node>``
(a heartbeat that expires after three heartbeats: liveness by Redis's own clock) and
``S:pos:<node>`` (the last entry the node applied).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, FirstError, gatherResults, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from cachesvc.purge import clusterio
from cachesvc.purge.clusterconfig import ClusterSettings
from cachesvc.purge.clusterio import Acks, Keys, newer
from cachesvc.purge.protocol import IPurge
from cachesvc.purge.workers import WorkerThread
from cachesvc.recache.redisclient import RedisClient, RedisError, RedisUnavailable

BLOCK = 1.0
"""Seconds one ``XREAD BLOCK`` waits for new entries before it is sent again."""


class _Reader(RedisClient):
    """The connection that blocks in ``XREAD``: its own, so commands never queue behind it."""

    poolsize = 1


class Cluster(Service):
    """The cluster channel of one node: publishes its purges, applies the others', keeps its place."""

    log = Logger()
    name = "cluster"

    def __init__(
        self, local: IPurge, settings: ClusterSettings, roots: tuple[str, ...], reactor: Any, max_line_length: int,
        lane: WorkerThread,
    ) -> None:
        """*lane* lists the zones on disk when this node must purge them all (PurgeService's deleter lane)."""
        self.local = local
        self._lane = lane
        self.settings = settings
        self.roots = roots
        self.max_line_length = max_line_length
        self._reactor = reactor
        self.keys = Keys(settings.stream, settings.node)
        timeout = max(2.0, settings.wait)
        self.redis = RedisClient(settings.address, settings.password, settings.db, reactor, timeout=timeout)
        self.reader = _Reader(settings.address, settings.password, settings.db, reactor, timeout=BLOCK + timeout)
        self.live: set[str] = set()  # other nodes whose heartbeat has not expired, as of the last beat
        self.caught_up = False
        self._ready: list[Deferred[None]] = []
        self._opened = False  # purges are served (caught up, or Redis was unreachable)
        self._acks = Acks(reactor)
        self._position = ""  # the last entry applied here (or originated here)
        self._read_position = ""  # the last entry read from the stream (applied, or waiting in _pending)
        self._pending: deque[tuple[str, dict[bytes, bytes]]] = deque()
        self._applying: Deferred[None] | None = None
        self._ack_position = ""
        self._down: str | None = None  # why Redis is unreachable, while it is (logged once per outage)
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = reactor

    # --- service --------------------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self.redis.startService()
        self.reader.startService()
        self._run().addErrback(lambda f: self.log.failure("cluster channel stopped", f))

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._beat.running:
            self._beat.stop()
        self._acks.abandon()
        self._open_gate()
        d: Deferred[Any] = self.redis.stopService()
        d.addBoth(lambda _: self.reader.stopService())
        return d.addBoth(lambda _: None)

    # --- the receiving node ------------------------------------------------------------------------

    def purge(self, raw: bytes) -> Deferred[bool]:
        """Purge here, hand the line to the cluster, and fire with whether every live node did it too."""
        if self.caught_up or self._opened or not self.running:
            return self._purge(raw)
        wait: Deferred[None] = Deferred()
        self._ready.append(wait)  # served once what was missed is applied
        return wait.addCallback(lambda _: self._purge(raw))

    @inlineCallbacks
    def _purge(self, raw: bytes) -> Generator[Deferred[Any], Any, bool]:
        outcome: list[bool] = []

        def seen(ok: bool) -> bool:
            outcome.append(ok)
            return ok

        local = self.local.purge(raw).addCallback(seen)
        if outcome == [False]:
            return False  # refused on its bytes alone (an empty line, a path outside the roots): not sent
        where: list[Any] = []
        parts = clusterio.split_path(raw)
        index = clusterio.root_of(parts[1], self.roots) if parts is not None else None
        if index is not None:
            where = ["root", self.roots[index], "root_index", index]  # lets nodes with other roots follow
        try:
            entry = yield self.redis.call(
                "XADD", self.keys.stream, "MINID", "~", self._trim_before(), "*",
                "node", self.settings.node, "line", raw, *where,
            )
        except (RedisUnavailable, RedisError) as e:
            self._outage(str(e))
            yield local
            return False
        self._back()
        expected = set(self.live)
        acks = self._acks.expect(entry, expected, self.settings.wait)
        ok_here = yield local
        answers = yield acks
        failed = sorted(n for n, ok in answers.items() if not ok)
        silent = sorted(expected - set(answers))
        if failed or silent:
            self.log.warn(
                "cluster purge {line!r}: {failed}{silent}; answered Purge: Error (purged here{local})",
                line=raw.decode("utf-8", "backslashreplace"),
                failed=f"failed on {', '.join(failed)}" if failed else "",
                silent=("; " if failed else "") + f"no answer within {self.settings.wait:g}s from {', '.join(silent)}"
                if silent else "",
                local="" if ok_here else " unsuccessfully",
            )
        return bool(ok_here) and not failed and not silent

    def _trim_before(self) -> str:
        return f"{int((self._reactor.seconds() - self.settings.retention) * 1000)}-0"

    # --- every node: catching up, then following -------------------------------------------------------

    @inlineCallbacks
    def _run(self) -> Generator[Deferred[Any], Any, None]:
        """Catch up, report live, follow the stream; after an outage, catch up again."""
        while self.running:
            try:
                yield self._catch_up()
                if not self._beat.running:
                    self._beat.start(self.settings.heartbeat, now=True)
                self._back()
                yield self._follow()
            except (RedisUnavailable, RedisError) as e:
                self._outage(str(e))
                self._open_gate()  # Redis is unreachable: serve local purges (answered Error) meanwhile
                if self.running:
                    yield deferLater(self._reactor, min(self.settings.heartbeat, 1.0), lambda: None)

    @inlineCallbacks
    def _catch_up(self) -> Generator[Deferred[Any], Any, None]:
        self._pending.clear()
        if self._applying is not None:
            yield self._applying  # what is being applied finishes, and keeps its place, first
        position = self._position or clusterio.text((yield self.redis.call("GET", self.keys.position)))
        info = yield clusterio.stream_info(self.redis, self.keys.stream)
        if not self._ack_position:
            last_ack = yield self.redis.call("XREVRANGE", self.keys.acks, "+", "-", "COUNT", 1)
            self._ack_position = clusterio.text(last_ack[0][0]) if last_ack else "0-0"
        if not position:
            position = info.last  # a new node: its cache holds nothing the stream could have purged
            self.log.info("cluster: node {node} joins at {id}", node=self.settings.node, id=position)
        elif newer(info.trimmed, position) or (yield self._lost_after(position, info)):
            self.log.warn(
                "cluster: entries after {id}, the last one node {node} applied, were trimmed from {stream} "
                "(purge.cluster.retention); purging every zone here once, hard, as it cannot know what it missed",
                id=position, node=self.settings.node, stream=self.keys.stream,
            )
            yield self._purge_everything()
            position = info.last
        self._position = position
        yield self.redis.call("SET", self.keys.position, position)
        applied = 0
        while True:
            batch = yield self.redis.call("XRANGE", self.keys.stream, "(" + self._position, "+", "COUNT", 100)
            if not batch:
                break
            for entry_id, fields in batch:
                applied += (yield self._apply(clusterio.text(entry_id), clusterio.fields(fields)))
        if applied:
            self.log.info("cluster: applied {count} purges missed since {id}", count=applied, id=position)
        self.caught_up = True
        self._open_gate()

    @inlineCallbacks
    def _lost_after(self, position: str, info: clusterio.StreamInfo) -> Generator[Deferred[Any], Any, bool]:
        """Whether entries after *position* may have been trimmed (by ``MINID``/``MAXLEN``, which Redis
        does not record as deletions): entries came after it, the stream now starts after it (or is
        empty), and the entry itself is gone.
        Conservative: trimming that took only entries up to *position* also counts."""
        if not newer(info.last, position):
            return False  # nothing was added after it
        if info.first and not newer(info.first, position):
            return False  # the stream still reaches back to it: nothing after it is gone
        if position == "0-0":
            return info.added > info.length
        still = yield self.redis.call("XRANGE", self.keys.stream, position, position)
        return not still

    @inlineCallbacks
    def _follow(self) -> Generator[Deferred[Any], Any, None]:
        """Read both streams; acknowledgements are recorded at once, purges are applied one by one
        beside the reading (a long purge being applied here never holds up the answers to ours)."""
        self._read_position = self._position
        while self.running:
            reply = yield self.reader.call(
                "XREAD", "COUNT", 100, "BLOCK", int(BLOCK * 1000),
                "STREAMS", self.keys.stream, self.keys.acks, self._read_position, self._ack_position,
            )
            streams = {stream: entries for stream, entries in reply or []}
            for entry_id, fields in streams.get(self.keys.acks.encode(), []):
                self._ack_position = clusterio.text(entry_id)
                self._acks.record(clusterio.fields(fields))
            for entry_id, fields in streams.get(self.keys.stream.encode(), []):
                self._read_position = clusterio.text(entry_id)
                self._pending.append((self._read_position, clusterio.fields(fields)))
            if self._pending and self._applying is None:
                self._applying = self._apply_pending()

    @inlineCallbacks
    def _apply_pending(self) -> Generator[Deferred[Any], Any, None]:
        try:
            while self._pending and self.running:
                entry, fields = self._pending.popleft()
                try:
                    yield self._apply(entry, fields)
                except (RedisUnavailable, RedisError) as e:
                    self._outage(str(e))  # the catch-up after the outage applies it from the last place kept
                    self._pending.clear()
        finally:
            self._applying = None

    @inlineCallbacks
    def _apply(self, entry: str, fields: dict[bytes, bytes]) -> Generator[Deferred[Any], Any, int]:
        """Apply one stream entry here (unless it came from here); acknowledge it; keep the place."""
        origin = fields.get(b"node", b"").decode("utf-8", "replace")
        applied = 0
        if origin != self.settings.node:
            line = fields.get(b"line", b"")
            index = fields.get(b"root_index", b"")
            if index.isdigit() and b"root" in fields:
                line = clusterio.rebase(line, fields[b"root"], int(index), self.roots)
            safe = len(line) <= self.max_line_length and b"\n" not in line and b"\r" not in line
            ok = bool((yield self.local.purge(line))) if safe else False
            applied = 1
            acked = self.redis.call(
                "XADD", self.keys.acks, "MAXLEN", "~", 100_000, "*",
                "id", entry, "node", self.settings.node, "ok", "1" if ok else "0",
            )
        else:
            acked = succeed(None)
        self._position = entry
        kept = self.redis.call("SET", self.keys.position, entry)  # pipelined behind the acknowledgement
        try:
            yield gatherResults([acked, kept], consumeErrors=True)
        except FirstError as e:
            e.subFailure.raiseException()  # RedisUnavailable: the catch-up after the outage goes on from here
        return applied

    @inlineCallbacks
    def _purge_everything(self) -> Generator[Deferred[Any], Any, None]:
        roots = self.roots
        zones = yield self._lane.submit(lambda: clusterio.zone_roots(roots))
        for path in zones:
            yield self.local.purge(b"hard:" + path.encode())

    # --- liveness ------------------------------------------------------------------------------------

    @inlineCallbacks
    def _heartbeat(self) -> Generator[Deferred[Any], Any, None]:
        try:
            beat_ms = int(self.settings.heartbeat * 3000)
            yield self.redis.call("SET", self.keys.heartbeat, "1", "PX", beat_ms)
            yield self.redis.call("SADD", self.keys.members, self.settings.node)
            members = [clusterio.text(m) for m in (yield self.redis.call("SMEMBERS", self.keys.members))]
            others = sorted(m for m in members if m != self.settings.node)
            beats = (yield self.redis.call("MGET", *[self.keys.heartbeat_of(m) for m in others])) if others else []
            self.live = {m for m, beat in zip(others, beats, strict=True) if beat is not None}
        except (RedisUnavailable, RedisError) as e:
            self._outage(str(e))

    # --- outages ---------------------------------------------------------------------------------------

    def _outage(self, reason: str) -> None:
        if self._down is None:
            self.log.error(
                "cluster: Redis at {address} is unreachable ({reason}); purges are applied here only and "
                "answered Purge: Error until it answers, then this node catches up",
                address=self.settings.address, reason=reason,
            )
        self._down = reason

    def _back(self) -> None:
        if self._down is not None:
            self._down = None
            self.log.info("cluster: Redis at {address} answers again", address=self.settings.address)

    def when_open(self) -> Deferred[None]:
        """Fires once this node serves purges: it has caught up, or Redis did not answer at start."""
        if self.caught_up or self._opened:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready.append(d)
        return d

    def _open_gate(self) -> None:
        self._opened = True
        waiting, self._ready = self._ready, []
        for d in waiting:
            d.callback(None)

