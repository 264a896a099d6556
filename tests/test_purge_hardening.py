"""Issue 9, the purge service in-process: floods, time limits, connection caps, symlinks, trash, fair scans.

Each test drives the real protocol, purger, scanner or trash with ``StringTransport`` and ``Clock``
(or real temporary directories) and fails on the code before the fix.
"""

from __future__ import annotations

import os
import pwd
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from cachesvc import config
from cachesvc.listening import LISTEN_BACKLOG, with_backlog
from cachesvc.purge.deleter import Deleted
from cachesvc.purge.nginxcache import PrefixScanner, ScanResult, purge_prefixes
from cachesvc.purge.paths import PathPolicy, PurgeTarget, Refused
from cachesvc.purge.protocol import ERROR, LINES_PER_TURN, MAX_UNANSWERED, SUCCESS, PurgeFactory, PurgeProtocol
from cachesvc.purge.purger import Purger
from cachesvc.purge.ratelimit import LogBudget
from cachesvc.purge.trash import Trash
from harness.nginxfiles import write_entry

PEER = IPv4Address("TCP", "127.0.0.1", 50000)


# --- doubles -------------------------------------------------------------------------------------


class RecordingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class NoDeleter:
    def delete(self, target: PurgeTarget, harvest: object = None) -> Deferred[Deleted]:
        raise AssertionError(f"nothing may be deleted here ({target})")


class ManualPurger:
    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.pending: list[Deferred[bool]] = []

    def purge(self, raw: bytes) -> Deferred[bool]:
        self.requests.append(raw)
        d: Deferred[bool] = Deferred()
        self.pending.append(d)
        return d


class SyncLane:
    """Runs a job at once, on the calling thread (the scanner only needs ``submit``)."""

    def submit(self, job: Callable[[], Any]) -> Deferred[Any]:
        try:
            return succeed(job())
        except BaseException:
            return fail()


class ManualLane:
    """Keeps submitted jobs until the test runs them."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def start(self) -> None:
        pass

    def abandon(self) -> None:
        pass

    def submit(self, job: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((job, d))
        return d

    def run_next(self) -> None:
        job, d = self.jobs.pop(0)
        d.callback(job())


def refusing_purger(clock: Clock) -> Purger:
    """The real purger, refusing everything a flood sends (no deletion may happen)."""
    return Purger(PathPolicy(["/cache"]), NoDeleter(), clock)  # type: ignore[arg-type]


def connect(purger: Any, clock: Clock, idle: float = 30.0, **limits: int) -> tuple[PurgeProtocol, RecordingTransport]:
    factory = PurgeFactory(purger, clock, idle, 4096, **limits)
    proto = factory.buildProtocol(PEER)
    assert proto is not None
    transport = RecordingTransport()
    proto.makeConnection(transport)
    return proto, transport


def turn(clock: Clock) -> int:
    """One reactor turn: run the calls due now, not those they schedule for now (as the reactor does)."""
    due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)
    return len(due)


def turns(clock: Clock) -> int:
    """Run reactor turns until nothing is due; return how many it took."""
    n = 0
    while turn(clock):
        n += 1
    return n


# --- the newline flood ---------------------------------------------------------------------------


def test_a_newline_flood_is_answered_in_slices_that_yield_to_the_reactor() -> None:
    clock = Clock()
    proto, transport = connect(refusing_purger(clock), clock)
    proto.dataReceived(b"\n" * 65536)  # 64 KiB: 65,536 empty lines in one read
    assert len(transport.writes) <= LINES_PER_TURN  # one slice, then back to the reactor
    assert transport.producerState == "paused"  # not read while the backlog lasts
    assert turns(clock) >= MAX_UNANSWERED // LINES_PER_TURN
    # Every empty line keeps its answer (Purge: Error, one write each), up to the bound, then one more
    # Error for the line that passed it, and the connection closes.
    assert transport.writes == [ERROR] * (MAX_UNANSWERED + 1)
    assert transport.disconnecting


def test_lines_within_the_bound_are_all_answered_and_reading_resumes() -> None:
    clock = Clock()
    proto, transport = connect(refusing_purger(clock), clock)
    proto.dataReceived(b"\n" * 1000)
    turns(clock)
    assert transport.writes == [ERROR] * 1000
    assert not transport.disconnecting and transport.producerState == "producing"
    proto.dataReceived(b"\r\n")
    assert transport.writes[-1] == ERROR and len(transport.writes) == 1001


def test_pipelined_purges_stop_being_read_while_they_wait() -> None:
    clock = Clock()
    purger = ManualPurger()
    proto, transport = connect(purger, clock)
    proto.dataReceived(b"/cache/a\n/cache/b\n/cache/c\n")
    assert purger.requests == [b"/cache/a"] and transport.producerState == "paused"
    purger.pending[0].callback(True)
    assert transport.producerState == "paused"  # /cache/c still waits
    purger.pending[1].callback(False)
    assert transport.producerState == "producing"  # nothing waits: /cache/c runs, the next line may come
    purger.pending[2].callback(True)
    assert transport.writes == [SUCCESS, ERROR, SUCCESS] and transport.producerState == "producing"


def test_the_bound_counts_lines_still_waiting() -> None:
    clock = Clock()
    purger = ManualPurger()
    proto, transport = connect(purger, clock, max_unanswered=3)
    proto.dataReceived(b"/cache/a\n/cache/b\n/cache/c\n/cache/d\n/cache/e\n")
    assert transport.writes == []
    for i in range(3):
        purger.pending[i].callback(True)
    assert purger.requests == [b"/cache/a", b"/cache/b", b"/cache/c"]
    assert transport.writes == [SUCCESS, SUCCESS, SUCCESS, ERROR] and transport.disconnecting


def test_lines_sent_before_the_peer_closed_are_still_purged_in_order() -> None:
    clock = Clock()
    purger = ManualPurger()
    proto, transport = connect(purger, clock)
    proto.dataReceived(b"/cache/a\n/cache/b\n/cache/c")
    purger.pending[0].callback(True)
    proto.connectionLost()
    purger.pending[1].callback(True)
    assert purger.requests == [b"/cache/a", b"/cache/b", b"/cache/c"]
    purger.pending[2].callback(True)
    assert transport.writes == [SUCCESS]  # answered while connected; nobody to answer afterwards


def test_refused_purges_are_logged_as_a_burst_then_counts(logged: list[str]) -> None:
    clock = Clock()
    purger = refusing_purger(clock)
    for _ in range(5000):
        assert purger.purge(b"").result is False  # type: ignore[attr-defined]
    refused = [line for line in logged if "refused: empty request" in line]
    assert 1 <= len(refused) <= 100
    clock.advance(10)
    assert f"{5000 - len(refused)} more purge requests refused in the last 10 s" in logged
    for _ in range(7):
        purger.purge(b"relative")
    clock.advance(10)  # still flooding: counted, no second burst
    assert "7 more purge requests refused in the last 10 s" in logged
    clock.advance(10)  # a quiet window ends the counting
    before = len(logged)
    purger.purge(b"again")
    assert any("purge 'again' refused: not an absolute path" in line for line in logged[before:])


def test_log_budget_reports_nothing_when_nothing_was_held_back(logged: list[str]) -> None:
    clock = Clock()
    budget = LogBudget(purger_log(), clock, "things", burst=2, period=5)
    budget.emit(warn(), "one")
    budget.emit(warn(), "two")
    clock.advance(60)
    assert logged == ["one", "two"] and not clock.getDelayedCalls()


def purger_log() -> Any:
    from twisted.logger import Logger

    return Logger(namespace="test")


def warn() -> Any:
    from twisted.logger import LogLevel

    return LogLevel.warn


# --- time limits ---------------------------------------------------------------------------------


def test_a_line_must_be_complete_within_idle_timeout_of_its_first_byte() -> None:
    clock = Clock()
    proto, transport = connect(ManualPurger(), clock, idle=3)
    for byte in b"/cache/slow":  # one byte a second: each one used to restart the idle timer
        proto.dataReceived(bytes([byte]))
        clock.advance(1)
        if transport.disconnecting:
            break
    assert transport.disconnecting
    assert clock.seconds() <= 3.0


def test_complete_lines_are_activity_and_the_next_line_gets_its_own_time() -> None:
    clock = Clock()
    purger = ManualPurger()
    proto, transport = connect(purger, clock, idle=3)
    proto.dataReceived(b"/cache/a\n/cac")
    clock.advance(100)  # a long purge: no limit runs
    assert not transport.disconnecting
    purger.pending[0].callback(True)
    clock.advance(2.9)  # the incomplete line's time started when it could be read
    assert not transport.disconnecting
    proto.dataReceived(b"he/b\n")
    purger.pending[1].callback(True)
    clock.advance(2.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting and transport.writes == [SUCCESS, SUCCESS]


def test_replies_the_client_does_not_read_pause_it_and_close_it_after_idle_timeout() -> None:
    clock = Clock()
    purger = ManualPurger()
    proto, transport = connect(purger, clock, idle=5)
    proto.pauseProducing()  # what the TCP transport does when its write buffer is full
    proto.dataReceived(b"/cache/a\n")
    assert purger.requests == [] and transport.producerState == "paused"
    clock.advance(4)
    proto.resumeProducing()
    assert purger.requests == [b"/cache/a"]
    purger.pending[0].callback(True)
    proto.pauseProducing()
    clock.advance(5.1)
    assert transport.disconnecting and transport.disconnected  # aborted: StringTransport's flag for it


# --- connections ---------------------------------------------------------------------------------


def test_connections_beyond_max_connections_are_refused_at_once(logged: list[str]) -> None:
    clock = Clock()
    factory = PurgeFactory(ManualPurger(), clock, 30, 4096, max_connections=2)
    protos = []
    for _ in range(2):
        proto = factory.buildProtocol(PEER)
        assert proto is not None
        proto.makeConnection(RecordingTransport())
        protos.append(proto)
    for _ in range(500):
        assert factory.buildProtocol(PEER) is None  # the port closes the socket at once
    refusals = [line for line in logged if "refusing purge connection" in line]
    assert 1 <= len(refusals) <= 100 and "purge.max_connections is 2" in refusals[0]
    protos[0].connectionLost()
    assert factory.buildProtocol(PEER) is not None
    clock.advance(10)
    assert any(f"{500 - len(refusals)} more purge connections refused" in line for line in logged)


@pytest.mark.parametrize(
    "given, listened",
    [
        ("tcp:7836:interface=127.0.0.1", f"tcp:7836:interface=127.0.0.1:backlog={LISTEN_BACKLOG}"),
        ("tcp:7836", f"tcp:7836:backlog={LISTEN_BACKLOG}"),
        ("tcp6:7836:interface=\\:\\:1", f"tcp6:7836:interface=\\:\\:1:backlog={LISTEN_BACKLOG}"),
        ("tcp:7836:backlog=64", "tcp:7836:backlog=64"),
        ("tcp:7836:127.0.0.1:64", "tcp:7836:127.0.0.1:64"),
        ("unix:/run/cachesvc/purge.sock", "unix:/run/cachesvc/purge.sock"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_listen_backlog_is_added_to_tcp_endpoints_that_set_none(given: str, listened: str) -> None:
    assert LISTEN_BACKLOG == 1024
    assert with_backlog(given) == listened


def test_max_connections_is_a_checked_setting(tmp_path: Path, cache_root: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"purge:\n  roots: [{cache_root}]\n  max_connections: 100\n")
    settings = config.resolve(str(path))
    assert settings.purge is not None and settings.purge.max_connections == 100
    assert config.resolve(None, roots=[str(cache_root)]).purge.max_connections == 512  # type: ignore[union-attr]
    path.write_text(f"purge:\n  roots: [{cache_root}]\n  max_connections: 0\n")
    with pytest.raises(config.ConfigError, match="purge.max_connections: 0 is out of range"):
        config.resolve(str(path))


# --- symlinks ------------------------------------------------------------------------------------


def test_a_prefix_purge_of_a_symlinked_zone_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    elsewhere = tmp_path / "elsewhere"
    root.mkdir()
    victim = write_entry(elsewhere, "httpsGETexample.com/blog/1")
    (root / "example.com").symlink_to(elsewhere)
    zone = PurgeTarget(str(root), ("example.com",))
    with pytest.raises(Refused, match="symlink"):
        purge_prefixes(zone, [b"httpsGETexample.com/blog/"])
    assert victim.exists()

    from cachesvc.purge.config import ZoneConfig, check_zone
    from cachesvc.purge.zones import ZoneMap

    policy = PathPolicy([str(root)])
    zones = ZoneMap([check_zone(ZoneConfig(hosts=["*"], path=f"{root}/{{host}}"), [str(root)])], policy)
    purger = Purger(policy, NoDeleter(), Clock(), zones, PrefixScanner([SyncLane()], None))  # type: ignore[arg-type]
    assert purger.purge(b"https://example.com/blog/*").result is False  # type: ignore[attr-defined]
    assert victim.exists()


def test_a_root_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(config.ConfigError, match="is a symlink"):
        config.resolve(None, roots=[str(tmp_path / "link")])
    (tmp_path / "slash").symlink_to("/")
    with pytest.raises(config.ConfigError, match="is a symlink"):
        config.resolve(None, roots=[str(tmp_path / "slash")])
    (tmp_path / "via").symlink_to(tmp_path)
    with pytest.raises(config.ConfigError, match="passes through a symlink"):
        config.resolve(None, roots=[str(tmp_path / "via" / "real")])
    assert config.resolve(None, roots=[str(real)]).purge is not None


# --- the trash -----------------------------------------------------------------------------------


def test_a_trash_writable_by_others_refuses_to_start(tmp_path: Path, cache_root: Path) -> None:
    trash = cache_root / ".cachesvc-trash"
    trash.mkdir()
    os.chmod(trash, 0o777)
    with pytest.raises(config.ConfigError, match="writable by group or others"):
        config.resolve(None, roots=[str(cache_root)])
    os.chmod(trash, 0o700)
    assert config.resolve(None, roots=[str(cache_root)]).purge is not None


class CallFromThreadReactor:
    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory owned by another user")
def test_a_trash_owned_by_another_user_is_not_used(tmp_path: Path, cache_root: Path, logged: list[str]) -> None:
    trash = cache_root / ".cachesvc-trash"
    trash.mkdir(mode=0o700)
    planted = trash / "theirs"
    planted.write_text("x")
    nobody = pwd.getpwnam("nobody")
    os.chown(trash, nobody.pw_uid, nobody.pw_gid)
    lane = ManualLane()
    bin_ = Trash(str(trash), [str(cache_root)], [lane], CallFromThreadReactor())  # type: ignore[arg-type]
    bin_.open()
    assert lane.jobs == []  # neither leftover cleaning nor background deletion
    assert any("refusing trash" in line and f"owned by uid {nobody.pw_uid}" in line for line in logged)
    zone = cache_root / "example.com"
    (zone / "a").mkdir(parents=True)
    parent = os.open(cache_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert bin_.move_aside(PurgeTarget(str(cache_root), ("example.com",)), parent, "example.com") is False
    finally:
        os.close(parent)
    assert planted.exists()


def move_zones(root: Path, trash: Trash, names: list[str]) -> None:
    parent = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            (root / name / "a" / "bc").mkdir(parents=True)
            (root / name / "a" / "bc" / "file").write_text("x")
            assert trash.move_aside(PurgeTarget(str(root), (name,)), parent, name)
        # An empty zone root needs no slot at all.
        (root / "empty.example").mkdir(exist_ok=True)
        assert not trash.move_aside(PurgeTarget(str(root), ("empty.example",)), parent, "empty.example")
    finally:
        os.close(parent)


def test_the_trash_deletes_slots_in_one_loop_and_reports_its_backlog_at_stop(
    cache_root: Path, logged: list[str]
) -> None:
    path = cache_root / ".trash"
    lane = ManualLane()
    first = Trash(str(path), [str(cache_root)], [lane], CallFromThreadReactor())  # type: ignore[arg-type]
    first.open()
    assert len(lane.jobs) == 2  # the leftovers, then one drain job for the trash's lifetime
    lane.run_next()
    move_zones(cache_root, first, [f"site{i}.example" for i in range(5)])
    assert first.backlog == 5 and len(lane.jobs) == 1  # queued for the drain: no job, no reactor trip per slot
    first.close()
    assert any("5 purged directories waiting for background deletion at stop; the next start deletes them" in line
               for line in logged)
    lane.run_next()  # the drain, after the stop: returns at once
    assert len(os.listdir(path)) == 5

    second = Trash(str(path), [str(cache_root)], [lane], CallFromThreadReactor())  # type: ignore[arg-type]
    second.open()
    lane.run_next()
    assert any(f"deleted 5 leftover files from trash {path}" in line for line in logged)
    drain, done = lane.jobs.pop(0)
    worker = threading.Thread(target=lambda: done.callback(drain()))
    worker.start()
    try:
        move_zones(cache_root, second, [f"again{i}.example" for i in range(3)])
        deadline = time.monotonic() + 10
        while second.backlog and time.monotonic() < deadline:
            time.sleep(0.01)
        assert second.backlog == 0 and os.listdir(path) == []
    finally:
        second.close()
        worker.join(10)
    assert not worker.is_alive()
    assert sum("background delete of" in line and "finished: 1 files" in line for line in logged) == 3
    assert any("0 purged directories waiting for background deletion at stop" in line for line in logged)


def test_normal_priority_lanes_help_only_while_the_backlog_is_long(cache_root: Path) -> None:
    from cachesvc.purge.trash import CATCH_UP_PARTS

    path = cache_root / ".trash"
    background, helper = ManualLane(), ManualLane()
    bin_ = Trash(str(path), [str(cache_root)], [background], CallFromThreadReactor(), catch_up=[helper])  # type: ignore[arg-type]
    bin_.open()
    background.run_next()  # leftovers; the background lane's drain is never run here
    drain, done = helper.jobs.pop(0)
    worker = threading.Thread(target=lambda: done.callback(drain()))
    worker.start()
    try:
        move_zones(cache_root, bin_, [f"few{i}.example" for i in range(3)])  # one part each
        time.sleep(0.3)
        assert bin_.backlog == 3  # a short backlog is the nice-19 lane's alone
        move_zones(cache_root, bin_, [f"many{i}.example" for i in range(CATCH_UP_PARTS + 30)])
        deadline = time.monotonic() + 10
        while bin_.backlog > CATCH_UP_PARTS and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert bin_.backlog == CATCH_UP_PARTS  # helped down to the line, then left the rest
    finally:
        bin_.close()
        worker.join(10)
    assert not worker.is_alive()


# --- fair prefix scans ---------------------------------------------------------------------------


def test_prefix_scans_serve_zones_fairly_and_share_walks(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    for i in range(10):
        write_entry(root / "big.example", f"httpsGETbig.example/{i}")
    write_entry(root / "small.example", "httpsGETsmall.example/x")
    big = PurgeTarget(str(root), ("big.example",))
    small = PurgeTarget(str(root), ("small.example",))
    lanes = [ManualLane(), ManualLane()]
    scanner = PrefixScanner(lanes, None)  # type: ignore[arg-type]
    busy = [scanner.scan(big, [f"httpsGETbig.example/{i}".encode()]) for i in range(20)]
    other = scanner.scan(small, [b"httpsGETsmall.example/"])
    # One lane walks the big zone; the other zone's purge does not queue behind the 19 waiting ones.
    assert [len(lane.jobs) for lane in lanes] == [1, 1]
    lanes[1].run_next()
    assert other.result == ScanResult(1, 1, other.result.seconds)  # type: ignore[attr-defined]
    lanes[0].run_next()
    assert busy[0].called and not any(d.called for d in busy[1:])
    # The 19 that waited share one walk, on a free lane; each counts its own prefixes.
    assert sum(len(lane.jobs) for lane in lanes) == 1
    next(lane for lane in lanes if lane.jobs).run_next()
    assert all(d.called for d in busy)
    assert [d.result.deleted for d in busy] == [1] * 10 + [0] * 10  # type: ignore[attr-defined]
    assert sum(len(lane.jobs) for lane in lanes) == 0


def test_one_walk_counts_each_request_by_its_own_prefixes(tmp_path: Path) -> None:
    from cachesvc.purge.nginxcache import purge_prefix_groups

    root = tmp_path / "cache"
    zone = root / "example.com"
    blog = [write_entry(zone, f"httpsGETexample.com/blog/{i}") for i in range(3)]
    shop = [write_entry(zone, f"httpsGETexample.com/shop/{i}") for i in range(2)]
    keep = write_entry(zone, "httpsGETexample.com/about")
    results = purge_prefix_groups(
        PurgeTarget(str(root), ("example.com",)),
        [[b"httpsGETexample.com/blog/"], [b"httpsGETexample.com/shop/"], [b"httpsGETexample.com/b"]],
    )
    assert [(r.scanned, r.deleted) for r in results] == [(6, 3), (6, 2), (6, 3)]
    assert not any(p.exists() for p in blog + shop) and keep.exists()
