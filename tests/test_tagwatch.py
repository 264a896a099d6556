"""TagIndex in-process (issue 11): cold scans, inotify and tag purges on real files, in the test's reactor.

Each test runs a :class:`~cachesvc.purge.tagwatch.TagIndex` over zones in ``tmp_path`` with its own
worker threads and real inotify, and a :class:`~cachesvc.purge.purger.Purger` beside it for whole
purge lines (the scan that answers while an index is not whole). Entries land as nginx lands them:
written elsewhere, renamed into their level directory, which may be new. Every wait is bounded.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.inotify import IN_Q_OVERFLOW
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python._inotify import INotifyError
from zope.interface import provider

from cachesvc.purge.deleter import BatchingDeleter, delete_now
from cachesvc.purge.nginxcache import PrefixScanner, ScanResult
from cachesvc.purge.notifier import Notifier
from cachesvc.purge.paths import PathPolicy, PurgeTarget
from cachesvc.purge.purger import Purger
from cachesvc.purge.tagindex import ZoneIndex
from cachesvc.purge.tags import DEFAULT_HEADERS, header_names
from cachesvc.purge.tagwatch import TagIndex
from cachesvc.purge.workers import WorkerThread
from cachesvc.purge.zones import Zone, ZoneMap
from harness.nginx import Site, entry_bytes
from harness.nginxfiles import FRESH_UNTIL, entry_path, valid_sec, write_entry
from tests.test_tags import RawOrigin, TagStack, response

T = TypeVar("T")
KEY = "$scheme$request_method$host$request_uri"
_temp_numbers = itertools.count(1)


def key(name: object) -> str:
    return f"httpGETz.example/{name}"


def tags_header(tags: str) -> str:
    return f"X-Cache-Tags: {tags}\r\n"


def tagged_bytes(name: object, tags: str) -> bytes:
    return entry_bytes(key(name), headers=[("X-Cache-Tags", tags)])


def land(zone: Path, name: object, tags: str, via: Path | None = None, at: Path | None = None) -> Path:
    """As nginx: the whole file written under a temp name (beside it, or in *via*), then renamed into its level
    directory (made first if missing). *at*: that path instead of the one the key's md5 gives."""
    path = at or entry_path(zone, key(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = (via or path.parent) / f"{path.name}.{next(_temp_numbers):010d}"
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(tagged_bytes(name, tags))
    os.rename(temp, path)
    return path


def hex_name(seed: object) -> str:
    return hashlib.md5(str(seed).encode()).hexdigest()


def rel(zone: Path, path: Path) -> str:
    return str(path.relative_to(zone))


class Run:
    """A TagIndex over *zones* below *root* on the real reactor, its lanes, a Purger using it, the log lines."""

    def __init__(self, root: Path, zones: list[str], headers: tuple[str, ...] = DEFAULT_HEADERS) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.policy = PathPolicy([str(root)])
        self.zones = [Zone(frozenset({"*"}), path, (1, 2), KEY, ("GET",)) for path in zones]
        self.lane = WorkerThread(global_reactor, "test-tags")
        self.scan_lane = WorkerThread(global_reactor, "test-tag-scan")
        self.walk_lane = WorkerThread(global_reactor, "test-walk")
        self.delete_lane = WorkerThread(global_reactor, "test-delete")
        self.lanes = [self.lane, self.scan_lane, self.walk_lane, self.delete_lane]
        self.index = TagIndex(
            self.zones, self.policy, header_names(headers), self.lane, self.scan_lane, global_reactor
        )
        deleter = BatchingDeleter(
            self.delete_lane, lambda target, harvest, roots: delete_now(target, None, harvest, roots)
        )
        self.purger = Purger(
            self.policy, deleter, global_reactor, ZoneMap(self.zones, self.policy),
            PrefixScanner([self.walk_lane], global_reactor), reactor=global_reactor, tags=self.index,
        )
        self.lines: list[str] = []
        self.gates: list[threading.Event] = []
        lines = self.lines

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if str(event.get("log_namespace", "")).startswith("cachesvc"):
                lines.append(formatEvent(event))

        self._observer = observe

    def start(self) -> Run:
        globalLogPublisher.addObserver(self._observer)
        for lane in self.lanes:
            lane.start()
        self.index.start()
        return self

    def close(self) -> None:
        globalLogPublisher.removeObserver(self._observer)
        for gate in self.gates:
            gate.set()
        self.index.stop()
        for lane in self.lanes:
            lane.abandon()

    def hold(self, lane: WorkerThread) -> threading.Event:
        """Keep *lane* busy until the returned event is set (or 30 s): what is submitted after waits."""
        gate, busy = threading.Event(), threading.Event()
        self.gates.append(gate)

        def held() -> None:
            busy.set()
            gate.wait(30)

        lane.submit(held)
        return gate

    def target(self, path: Path | str) -> PurgeTarget:
        return self.policy.target(str(path).encode())

    def purge(self, scope: Path, tags: str, mode: str = "hard") -> Deferred[ScanResult | None]:
        """A tag purge asked of the index: ``None`` means it is not whole there (the caller would scan)."""
        return self.index.purge(self.target(scope), frozenset(tags.split(",")), mode, None)

    def line(self, text: str) -> Deferred[bool]:
        return self.purger.purge(text.encode())

    def ready_lines(self, zone: Path | str) -> list[str]:
        return [x for x in self.lines if x.startswith(f"tag index ready for {zone}:")]

    def purge_lines(self, text: str) -> list[str]:
        return [x for x in self.lines if x.startswith(f"purge {text!r} ")]

    def zone_index(self, zone: Path) -> ZoneIndex:
        return self.index.indexes[str(zone)]


async def within(d: Deferred[T], seconds: float = 10.0) -> T:
    return await d.addTimeout(seconds, global_reactor)


async def turn(seconds: float = 0.0) -> None:
    await within(task.deferLater(global_reactor, seconds, lambda: None))


async def until(check: Callable[[], Any], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        await turn(0.01)


async def ready(run: Run, zone: Path | str, count: int = 1) -> str:
    await until(lambda: len(run.ready_lines(zone)) >= count, f"tag index ready for {zone} (#{count})")
    return run.ready_lines(zone)[count - 1]


async def purged(run: Run, scope: Path, tags: str, mode: str = "hard") -> ScanResult:
    """A tag purge the index must answer (it is whole)."""
    result = await within(run.purge(scope, tags, mode))
    assert result is not None, f"the index did not answer tag purge {tags!r} of {scope}"
    return result


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    made: list[Run] = []

    def make(*zones: Path | str, headers: tuple[str, ...] = DEFAULT_HEADERS) -> Run:
        made.append(Run(tmp_path / "cache", [str(z) for z in zones], headers))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def zone(tmp_path: Path) -> Path:
    path = tmp_path / "cache" / "z.example"
    path.mkdir(parents=True)
    return path


# --- the cold scan ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cold_scan_then_one_ready_line_and_only_cache_entries_are_indexed(run: Any, zone: Path) -> None:
    entries = [write_entry(zone, key(i), headers=tags_header(f"all e-{i} g-{i % 3}")) for i in range(30)]
    untagged = write_entry(zone, key("untagged"))
    level = entries[0].parent
    others = {
        "temp": level / f"{entries[0].name}.0000000001",  # nginx's temp file beside the entry
        "upper": level / entries[1].name.upper(),
        "short": level / (entries[2].name[:31]),
        "notes": zone / "notes.txt",
        "no-header": level / hex_name("no-header"),
    }
    for what, path in others.items():
        path.write_bytes(b"<html>not a cache file</html>" if what == "no-header" else tagged_bytes(what, "all"))
    v4 = level / hex_name("v4")
    v4.write_bytes(b"\x04" + tagged_bytes("v4", "all")[1:])
    others["v4"] = v4
    before = {what: path.read_bytes() for what, path in others.items()}
    r = run(zone).start()
    line = await ready(r, zone)
    assert re.fullmatch(
        rf"tag index ready for {re.escape(str(zone))}: 30 entries, 34 tags \(90 entry-tag pairs\) in \d+\.\d\d s", line
    ), line
    assert sorted(r.zone_index(zone).entries) == sorted(rel(zone, p) for p in entries)
    assert r.zone_index(zone).counts() == (30, 34, 90)
    result = await purged(r, zone, "all")
    assert (result.scanned, result.deleted) == (30, 30)
    assert not any(p.exists() for p in entries)
    assert {what: path.read_bytes() for what, path in others.items()} == before
    assert untagged.exists()
    await turn(0.1)
    assert len(r.ready_lines(zone)) == 1


@pytest_twisted.ensureDeferred
async def test_only_the_configured_headers_are_indexed(run: Any, zone: Path) -> None:
    write_entry(zone, key("a"), headers="X-Cache-Tags: via-x\r\nCache-Tag: via-cache-tag\r\n")
    r = run(zone, headers=("Cache-Tag",)).start()
    await ready(r, zone)
    assert list(r.zone_index(zone).by_tag) == ["via-cache-tag"]


@pytest_twisted.ensureDeferred
async def test_too_many_tags_are_logged(run: Any, zone: Path) -> None:
    write_entry(zone, key("many"), headers=tags_header(" ".join(f"t{i}" for i in range(1003)) + " " + "x" * 1025))
    r = run(zone).start()
    await ready(r, zone)
    warned = [x for x in r.lines if "more tags than are indexed" in x]
    assert len(warned) == 1 and "4 ignored" in warned[0], warned
    assert r.zone_index(zone).counts() == (1, 1000, 1000)


# --- inotify ----------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_entries_renamed_into_place_are_purged_by_the_line_right_after(
    run: Any, zone: Path, tmp_path: Path
) -> None:
    old = write_entry(zone, key("old"), headers=tags_header("other"))
    r = run(zone).start()
    await ready(r, zone)
    for i in range(40):
        via = tmp_path / "nginx-temp" if i % 2 else None  # use_temp_path on (a temp directory) and off (beside)
        at = old.parent / hex_name(i) if i % 4 < 2 else None  # into a watched directory, or where the key goes
        path = land(zone, f"new-{i}", f"fresh-{i} shared", via=via, at=at)
        result = await purged(r, zone, f"fresh-{i}")  # no wait between the rename and the purge
        assert (result.deleted, path.exists()) == (1, False), f"entry {i} ({rel(zone, path)})"
    assert old.exists()


@pytest_twisted.ensureDeferred
async def test_purge_lines_right_after_the_rename_through_the_purger(run: Any, zone: Path) -> None:
    write_entry(zone, key("seed"), headers=tags_header("seed"))
    r = run(zone).start()
    await ready(r, zone)
    paths = [land(zone, f"p-{i}", "post-1 home" if i % 2 else "post-2 home") for i in range(20)]
    assert await within(r.line(f"tag:{zone} post-1")) is True
    assert [p.exists() for p in paths] == [i % 2 == 0 for i in range(20)]
    [logged] = r.purge_lines(f"tag:{zone} post-1")
    assert re.fullmatch(
        rf"purge 'tag:{re.escape(str(zone))} post-1' deleted, 10 deleted of 10 candidates, answered by the index, "
        r"\d+\.\d ms",
        logged,
    ), logged


@pytest_twisted.ensureDeferred
async def test_new_level_directories_after_start(run: Any, zone: Path) -> None:
    seed = write_entry(zone, key("seed"), headers=tags_header("seed"))
    r = run(zone).start()
    await ready(r, zone)
    level1 = {p.name for p in zone.iterdir()}
    fresh_top = next(i for i in itertools.count() if entry_path(zone, key(f"n{i}")).parent.parent.name not in level1)
    # A new level-1 and level-2 directory, made as nginx makes them (the rename failed, the path was made).
    path = land(zone, f"n{fresh_top}", "in-new-dir")
    assert (await purged(r, zone, "in-new-dir")).deleted == 1 and not path.exists()
    # Another level-2 directory below the new level-1 one, and an entry in a new directory right away.
    new_top = path.parent.parent
    second = land(zone, "n2", "in-second", at=new_top / "zz" / hex_name("second"))
    third = land(zone, "n3", "in-third", at=new_top / "yy" / "xx" / hex_name("third"))  # deeper than levels
    result = await purged(r, zone, "in-second,in-third")
    assert (result.deleted, second.exists(), third.exists()) == (2, False, False)
    # The new directories are watched: entries later renamed into them are seen too.
    await turn(0.05)
    later = [land(zone, f"l{i}", "later", at=d / hex_name(f"later-{i}")) for i, d in enumerate(
        [path.parent, new_top / "zz", new_top / "yy" / "xx"]
    )]
    assert (await purged(r, zone, "later")).deleted == 3 and not any(p.exists() for p in later)
    assert seed.exists()


@pytest_twisted.ensureDeferred
async def test_an_entry_replaced_with_other_tags(run: Any, zone: Path) -> None:
    path = write_entry(zone, key("page"), headers=tags_header("old-tag kept"))
    r = run(zone).start()
    await ready(r, zone)
    land(zone, "page", "new-tag kept")  # nginx's new copy, renamed over the old one
    result = await purged(r, zone, "old-tag")
    assert (result.deleted, path.exists()) == (0, True)
    assert b"new-tag" in path.read_bytes()
    result = await purged(r, zone, "new-tag")
    assert (result.deleted, path.exists()) == (1, False)


@pytest_twisted.ensureDeferred
async def test_entries_removed_or_replaced_behind_the_index(run: Any, zone: Path) -> None:
    gone = write_entry(zone, key("gone"), headers=tags_header("gone-tag"))
    real = write_entry(zone, key("real"), headers=tags_header("real-tag"))
    r = run(zone).start()
    await ready(r, zone)
    gone.unlink()
    result = await purged(r, zone, "gone-tag")
    assert result.deleted == 0 and await within(r.line(f"tag:{zone} gone-tag")) is True
    # What the index believes no longer holds (as after lost events): corrected when the purge looks.
    index = r.zone_index(zone)
    index.put(rel(zone, real), ("ghost-tag",))
    index.put(f"{rel(zone, real.parent)}/{hex_name('never')}", ("ghost-tag",))
    result = await purged(r, zone, "ghost-tag")
    assert (result.scanned, result.deleted, real.exists()) == (2, 0, True)
    assert index.carrying(["ghost-tag"]) == []
    assert index.carrying(["real-tag"]) == [rel(zone, real)]


@pytest_twisted.ensureDeferred
async def test_symlinks_in_a_zone_are_never_followed(run: Any, zone: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside_entry = outside / "cd" / hex_name("outside")
    outside_entry.parent.mkdir(parents=True)
    outside_entry.write_bytes(tagged_bytes("outside", "post-1"))
    mtime = (int(time.time()) - 3600) * 10**9
    os.utime(outside_entry, ns=(mtime, mtime))
    original = outside_entry.read_bytes()
    inside = write_entry(zone, key("inside"), headers=tags_header("post-1"))
    (zone / "7").symlink_to(outside, target_is_directory=True)  # a level-1 directory that is a link
    (inside.parent / hex_name("file-link")).symlink_to(outside_entry)  # an entry that is a link
    r = run(zone).start()
    await ready(r, zone)
    (zone / "8").symlink_to(outside, target_is_directory=True)  # planted after start
    staged = zone / "staged-link"
    staged.symlink_to(outside_entry)
    os.rename(staged, inside.parent / hex_name("renamed-link"))  # renamed into place, as an entry would be
    assert r.zone_index(zone).carrying(["post-1"]) == [rel(zone, inside)]
    soft = await purged(r, zone, "post-1", "soft")
    assert soft.marked == 1 and valid_sec(inside) < time.time()
    hard = await purged(r, zone, "post-1")
    assert hard.deleted == 1 and not inside.exists()
    # While the index is not whole the scan answers: it does not follow them either.
    write_entry(zone, key("inside-2"), headers=tags_header("post-1"))
    r.hold(r.scan_lane)
    r.index._events([(-1, IN_Q_OVERFLOW, b"")])
    assert await within(r.line(f"soft:tag:{zone} post-1")) is True
    assert await within(r.line(f"tag:{zone} post-1")) is True
    assert "answered by a scan" in r.purge_lines(f"tag:{zone} post-1")[0]
    assert not entry_path(zone, key("inside-2")).exists()
    assert outside_entry.read_bytes() == original and outside_entry.stat().st_mtime_ns == mtime
    assert all(os.path.islink(p) for p in (zone / "7", zone / "8", inside.parent / hex_name("renamed-link")))


# --- while the index is not whole -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_scan_answers_exactly_until_the_cold_scan_has_finished(run: Any, zone: Path) -> None:
    before = [write_entry(zone, key(i), headers=tags_header("post-1" if i % 2 else "post-2")) for i in range(20)]
    r = run(zone)
    gate = r.hold(r.scan_lane)  # the cold scan cannot start
    r.start()
    during = [land(zone, f"d{i}", "post-1" if i % 2 else "post-3") for i in range(10)]
    assert await within(r.purge(zone, "post-1")) is None
    assert await within(r.line(f"tag:{zone} post-1")) is True
    assert [p.exists() for p in before + during] == [i % 2 == 0 for i in range(20)] + [i % 2 == 0 for i in range(10)]
    [logged] = r.purge_lines(f"tag:{zone} post-1")
    assert "deleted, 15 deleted of " in logged and "answered by a scan (the index is not ready)" in logged, logged
    assert r.ready_lines(zone) == []
    gate.set()
    await ready(r, zone)
    later = land(zone, "later", "post-3")
    assert await within(r.line(f"tag:{zone} post-3")) is True
    [logged] = r.purge_lines(f"tag:{zone} post-3")
    assert "6 deleted of 6 candidates, answered by the index" in logged, logged
    assert not later.exists() and all(p.exists() for p in before[::2])


@pytest_twisted.ensureDeferred
async def test_changes_during_the_cold_scan_are_in_the_index_when_it_is_ready(
    run: Any, zone: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan pauses after listing a level-2 directory, before merging what it read there: changes in
    directories it has read, in the one it is merging, in those it has not reached and in new ones."""
    for i in range(400):  # 20 level-2 directories of 20 entries each
        path = zone / str(i % 4) / f"a{i % 5}" / hex_name(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tagged_bytes(i, f"old-{i}"))
    merged: list[str] = []
    paused, resume = threading.Event(), threading.Event()
    original = ZoneIndex.merge

    def merge(self: ZoneIndex, scanned: dict[str, tuple[str, ...]]) -> None:
        if scanned and len(merged) == 5 and not paused.is_set():
            merged.append(next(iter(scanned)).rpartition("/")[0])
            paused.set()
            resume.wait(30)
        elif scanned:
            merged.append(next(iter(scanned)).rpartition("/")[0])
        original(self, scanned)

    monkeypatch.setattr(ZoneIndex, "merge", merge)
    r = run(zone)
    r.gates.append(resume)
    r.start()
    await until(paused.is_set, "the scan paused")
    done, current = merged[:-1], merged[-1]
    by_dir: dict[str, list[Path]] = {}
    for p in zone.rglob("*"):
        if p.is_file():
            by_dir.setdefault(rel(zone, p.parent), []).append(p)
    not_yet = next(d for d in sorted(by_dir) if d not in merged and len(by_dir[d]) >= 2)
    changes: dict[str, Path] = {}
    for where, d in (("done", done[0]), ("current", current), ("not-yet", not_yet)):
        replaced, removed = by_dir[d][0], by_dir[d][1]
        land(zone, f"r-{where}", f"changed-{where}", at=replaced)
        removed.unlink()
        changes[f"replaced-{where}"] = replaced
        changes[f"added-{where}"] = land(zone, f"a-{where}", f"changed-{where}", at=zone / d / hex_name(where))
    new_dir = land(zone, "new-dir", "changed-new", at=zone / "q" / "qq" / hex_name("new-dir"))
    index = r.zone_index(zone)
    await until(lambda: len(index.carrying(["changed-done", "changed-current", "changed-new"])) == 5, "events")
    resume.set()
    await ready(r, zone)
    assert index.whole
    for where in ("done", "current", "not-yet"):
        result = await purged(r, zone, f"changed-{where}")
        assert result.deleted == 2, f"{where}: {result}"
        assert not changes[f"replaced-{where}"].exists() and not changes[f"added-{where}"].exists()
    assert (await purged(r, zone, "changed-new")).deleted == 1 and not new_dir.exists()
    assert index.counts()[0] == 400 - 3 - 3


@pytest_twisted.ensureDeferred
async def test_an_overflow_makes_purges_scan_until_the_index_is_rebuilt(run: Any, zone: Path) -> None:
    kept = [write_entry(zone, key(i), headers=tags_header("post-1" if i % 2 else "post-2")) for i in range(20)]
    r = run(zone).start()
    await ready(r, zone)
    gate = r.hold(r.scan_lane)
    r.index._notifier._handler([(-1, IN_Q_OVERFLOW, b"")])
    await until(lambda: any("inotify overflowed" in x for x in r.lines), "the overflow warning")
    assert await within(r.purge(zone, "post-1")) is None
    assert await within(r.line(f"tag:{zone} post-1")) is True
    assert "answered by a scan" in r.purge_lines(f"tag:{zone} post-1")[0]
    assert [p.exists() for p in kept] == [i % 2 == 0 for i in range(20)]
    gate.set()
    await ready(r, zone, 2)
    assert (await purged(r, zone, "post-2")).deleted == 10


@pytest_twisted.ensureDeferred
async def test_a_real_inotify_overflow(run: Any, zone: Path) -> None:
    """More events than fs.inotify.max_queued_events while the reactor does not read: the kernel's overflow."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many files to overflow it")
    level = write_entry(zone, key("seed"), headers=tags_header("seed")).parent
    r = run(zone).start()
    await ready(r, zone)
    gate = r.hold(r.scan_lane)
    count = limit // 2 + 1000  # renamed into place beside their temp file: 2 or 3 events each, before any read
    data = [tagged_bytes(i, "bulk half" if i % 2 else "bulk") for i in range(2)]
    for i in range(count):
        temp = level / f"{hex_name(f'bulk-{i}')}.0000000001"
        temp.write_bytes(data[i % 2])
        os.rename(temp, level / hex_name(f"bulk-{i}"))
    assert await within(r.purge(zone, "half")) is None
    assert any("inotify overflowed" in x for x in r.lines)
    assert await within(r.line(f"tag:{zone} half"), 60) is True
    assert "answered by a scan" in r.purge_lines(f"tag:{zone} half")[0]
    left = {p.name for p in level.iterdir()}
    assert [hex_name(f"bulk-{i}") in left for i in range(count)] == [i % 2 == 0 for i in range(count)]
    gate.set()
    await ready(r, zone, 2)
    assert (await purged(r, zone, "bulk")).deleted == (count + 1) // 2


@pytest_twisted.ensureDeferred
async def test_an_overflow_during_a_cold_scan_is_not_forgotten_when_that_scan_ends(
    run: Any, zone: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events lost while a scan runs may be of directories it had read: only a scan begun after the overflow
    makes the index whole again, so until that one has finished tag purges must scan."""
    write_entry(zone, key("seed"), headers=tags_header("seed"))
    at_end, finish = threading.Event(), threading.Event()
    original = ZoneIndex.end_scan

    def end_scan(self: ZoneIndex) -> None:
        if not at_end.is_set():
            at_end.set()
            finish.wait(30)
        original(self)

    monkeypatch.setattr(ZoneIndex, "end_scan", end_scan)
    r = run(zone)
    r.gates.append(finish)
    r.start()
    await until(at_end.is_set, "the first cold scan at its end")
    r.index._events([(-1, IN_Q_OVERFLOW, b"")])  # lost events, while that scan runs
    await until(lambda: any("inotify overflowed" in x for x in r.lines), "the overflow warning")
    await turn(0.05)
    gate = r.hold(r.scan_lane)  # the scan begun after the overflow waits behind this
    finish.set()
    await until(lambda: r.zone_index(zone).scans == 1 and str(zone) not in r.index._rescan, "the first scan's end")
    await turn(0.05)
    assert await within(r.purge(zone, "seed")) is None, "a purge answered by an index that lost events"
    gate.set()
    await ready(r, zone)
    assert (await purged(r, zone, "seed")).deleted == 1


# --- soft tag purges, scopes, zones per host ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_soft_tag_purge_marks_instead_of_deleting(run: Any, zone: Path) -> None:
    marked = [write_entry(zone, key(i), headers=tags_header("post-1 home")) for i in range(5)]
    kept = [write_entry(zone, key(f"k{i}"), headers=tags_header("home")) for i in range(5)]
    before = [p.read_bytes() for p in marked]
    r = run(zone).start()
    await ready(r, zone)
    result = await purged(r, zone, "post-1", "soft")
    assert (result.marked, result.deleted) == (5, 0)
    now = time.time()
    for p, old in zip(marked, before, strict=True):
        data = p.read_bytes()
        assert valid_sec(p) < now and data[:8] == old[:8] and data[16:] == old[16:]
    assert all(valid_sec(p) == FRESH_UNTIL for p in kept)
    again = await purged(r, zone, "post-1", "soft")
    assert again.marked == 0 and all(p.exists() for p in marked)  # already expired: left as they are
    assert await within(r.line(f"soft:tag:{zone} post-1")) is True
    assert "0 marked expired of 5 candidates, answered by the index" in r.purge_lines(f"soft:tag:{zone} post-1")[0]
    assert (await purged(r, zone, "post-1")).deleted == 5
    assert all(p.exists() for p in kept)


@pytest_twisted.ensureDeferred
async def test_a_scope_below_a_zone(run: Any, zone: Path) -> None:
    paths = [write_entry(zone, key(i), headers=tags_header("t")) for i in range(40)]
    r = run(zone).start()
    await ready(r, zone)
    top = paths[0].parent.parent
    result = await purged(r, top, "t")
    assert result.deleted == sum(1 for p in paths if p.parent.parent == top)
    assert all(p.exists() == (p.parent.parent != top) for p in paths)
    assert (await purged(r, zone / "0" / "zz", "t")).deleted == 0  # nothing there: a success
    assert await within(r.line(f"tag:{zone}/0/zz t")) is True


@pytest_twisted.ensureDeferred
async def test_zones_per_host_appear_while_running(run: Any, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    old = root / "old.example"
    write_entry(old, key("o"), headers=tags_header("t"))
    r = run(f"{root}/{{host}}").start()
    await ready(r, old)
    new = root / "new.example"
    path = land(new, "n", "t")
    assert await within(r.line(f"tag:{new} t")) is True  # before its index exists: a scan
    assert not path.exists()
    await ready(r, new)
    again = land(new, "n2", "t")
    assert (await purged(r, new, "t")).deleted == 1 and not again.exists()
    assert (await purged(r, old, "t")).deleted == 1


# --- files real nginx writes ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_nginx_temp_files_are_not_indexed_and_their_entry_is_once_renamed(tmp_path: Path) -> None:
    """use_temp_path=off: nginx writes a response it caches to ``<md5>.<10 digits>`` beside its entry, then
    renames it. The origin stops half-way through a body larger than nginx's buffers, so the temp file
    is on disk while the index scans and a tag purge runs."""
    host, gate = "slow.example", threading.Event()
    half = b"x" * (256 * 1024)
    records = {
        "/slow": [response("X-Cache-Tags: slow-1 shared", body=b"<html>" + half), gate, half + b"</html>"],
        "/done": [response("X-Cache-Tags: done-1 shared")],
    }
    with TagStack([Site(host, use_temp_path=False)], fcgi=RawOrigin(records), daemon=False) as stack:
        zone = stack.zone(host)
        stack.until_hit(host, "/done")
        slow = threading.Thread(target=stack.get, args=(host, "/slow"), daemon=True)
        slow.start()
        try:
            await until(lambda: [p for p in zone.rglob("*.*") if p.is_file()], "nginx's temp file")
            [temp] = [p for p in zone.rglob("*.*") if p.is_file()]
            assert temp.name.startswith(stack.file(host, "/slow").name + ".")
            r = Run(stack.root, [str(zone)]).start()
            try:
                await ready(r, zone)
                assert list(r.zone_index(zone).entries) == [rel(zone, stack.file(host, "/done"))]
                result = await purged(r, zone, "shared")
                assert (result.deleted, temp.exists()) == (1, True)
                gate.set()
                await until(lambda: stack.file(host, "/slow").exists() and not temp.exists(), "the entry in place")
                result = await purged(r, zone, "slow-1")
                assert (result.deleted, stack.file(host, "/slow").exists()) == (1, False)
            finally:
                r.close()
        finally:
            gate.set()
            slow.join(10)


@pytest_twisted.ensureDeferred
async def test_a_directory_that_cannot_be_watched_makes_purges_scan(
    run: Any, zone: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inotify refuses a watch (fs.inotify.max_user_watches reached): the daemon warns that tag purges there
    scan instead, so an entry renamed into that directory later must still be purged."""
    blind = write_entry(zone, key("blind"), headers=tags_header("seed")).parent
    write_entry(zone, key("other"), headers=tags_header("seed"))
    original = Notifier.add

    def add(self: Notifier, path: bytes, mask: int) -> int:
        if os.fsdecode(os.readlink(path)) == str(blind):
            raise INotifyError("inotify_add_watch: no space left on device (the test's)")
        return original(self, path, mask)

    monkeypatch.setattr(Notifier, "add", add)
    r = run(zone).start()
    await until(lambda: any("cannot watch a directory" in x for x in r.lines), "the warning")
    await ready(r, zone)
    unseen = land(zone, "unseen", "unseen-tag", at=blind / hex_name("unseen"))
    assert await within(r.line(f"tag:{zone} unseen-tag")) is True
    assert not unseen.exists(), f"missed an entry in a directory the index could not watch: {r.lines[-1]}"


@pytest_twisted.ensureDeferred
async def test_a_scope_that_is_one_entry(run: Any, zone: Path) -> None:
    """``tag:<an entry's path> t``: the scan purges that file when it carries the tag; the index must too."""
    first = write_entry(zone, key("first"), headers=tags_header("t"))
    second = write_entry(zone, key("second"), headers=tags_header("t"))
    r = run(zone)
    gate = r.hold(r.scan_lane)
    r.start()
    assert await within(r.line(f"tag:{first} t")) is True
    assert "answered by a scan" in r.purge_lines(f"tag:{first} t")[0]
    assert (first.exists(), second.exists()) == (False, True)
    gate.set()
    await ready(r, zone)
    assert await within(r.line(f"tag:{second} t")) is True
    assert not second.exists(), r.purge_lines(f"tag:{second} t")[0]
