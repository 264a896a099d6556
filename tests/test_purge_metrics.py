"""The purge half's Prometheus metrics (cachesvc.purge.metrics), in-process.

The trash's census (a bounded walk) on real files and on a ``Clock``; the warmer's counters on a
hand-driven agent; then a whole :class:`~cachesvc.purge.service.PurgeService` in the test's reactor,
with zones, tags and warming on, taking purges of every form (path, url, prefix, soft, tag, a
refusal, a site purge): the scrape carries each, passes ``promtool check metrics`` (Debian's
``prometheus`` package; ``prometheus_client``'s parser and the same naming rules when promtool is
absent), and has no ``_created`` series.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater

from cachesvc.metrics import Metrics, process_registry
from cachesvc.purge import metrics as purge_metrics
from cachesvc.purge.config import PurgeConfig, TagsConfig, WarmConfig, WarmOrigins, ZoneConfig, check_purge
from cachesvc.purge.metrics import Census, TrashCensus, count_tree, on_lane, register_purge_metrics
from cachesvc.purge.service import PurgeService
from cachesvc.purge.workers import WorkerThread
from harness.daemon import free_port
from harness.nginxfiles import write_entry
from tests.test_warm import make

HOST = "z.example"


# --- checking an exposition ---------------------------------------------------------------------


def check_exposition(text: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Fail unless *text* is a clean Prometheus exposition; its samples, ``{name: {labels: value}}``.

    ``promtool check metrics`` when it is installed (Debian: ``prometheus``); the same rules through
    prometheus_client's parser otherwise. Never a ``_created`` series.
    """
    promtool = shutil.which("promtool")
    if promtool is not None:
        done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
        assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
            done.stdout.decode() + done.stderr.decode()
        )
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        assert family.documentation, f"{family.name} has no HELP"
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", family.name), family.name
        for sample in family.samples:
            assert not sample.name.endswith("_created"), sample.name
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    for name, kind in re.findall(rb"^# TYPE (\S+) (\S+)$", text, re.M):  # the parser adds _total where missing
        assert kind != b"counter" or name.endswith(b"_total"), f"counter {name.decode()} does not end in _total"
    assert b"_created" not in text
    return samples


def value(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float | None:
    return samples.get(name, {}).get(tuple(sorted(labels.items())))


@pytest.mark.parametrize("promtool", [True, False])
def test_the_checker_refuses_what_promtool_refuses(promtool: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not promtool:  # the fallback: prometheus_client's parser and the same rules
        monkeypatch.setattr(shutil, "which", lambda name: None)
    elif shutil.which("promtool") is None:
        pytest.skip("promtool (Debian: prometheus) is not installed")
    good = b"# HELP things_total Things.\n# TYPE things_total counter\nthings_total 1.0\n"
    assert check_exposition(good) == {"things_total": {(): 1.0}}
    for bad in (b"# HELP things_count A counter without _total.\n# TYPE things_count counter\nthings_count 1.0\n",
                good + b"# HELP things_created C.\n# TYPE things_created gauge\nthings_created 1.0\n"):
        with pytest.raises(AssertionError):
            check_exposition(bad)


# --- the trash census ---------------------------------------------------------------------------


def test_count_tree_counts_files_and_their_blocks_without_following_symlinks(tmp_path: Path) -> None:
    (tmp_path / "slot" / "a" / "b").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "slot" / "a" / "b" / f"f{i}").write_bytes(b"x" * 5000)
    (tmp_path / "slot" / "top").write_bytes(b"")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"y" * 100_000)
    (tmp_path / "slot" / "link").symlink_to(outside)
    files, size, complete = count_tree(str(tmp_path))
    blocks = sum(os.lstat(p).st_blocks for p in (tmp_path / "slot").rglob("*") if not p.is_dir() or p.is_symlink())
    assert (files, size, complete) == (7, blocks * 512, True)  # 5 + the empty file + the symlink itself
    assert size >= 5 * 4096


def test_count_tree_stops_at_its_bounds_and_says_so(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"f{i}").write_bytes(b"x")
    files, _, complete = count_tree(str(tmp_path), max_entries=10)
    assert files == 10 and not complete
    ticks = iter(range(0, 10**6, 10))  # every reading of the clock 10 s later
    files, _, complete = count_tree(str(tmp_path), max_seconds=5, monotonic=lambda: float(next(ticks)))
    assert not complete or files == 50  # the clock is read every 1,024 entries: 50 fit before the first look
    assert count_tree(str(tmp_path / "missing")) == (0, 0, True)


def test_census_walks_when_due_one_at_a_time_and_shows_the_last_finished(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 10)
    clock = Clock()
    started: list[Callable[[], None]] = []
    census = TrashCensus(str(tmp_path), start=started.append, clock=clock.seconds, interval=15)
    assert census.poll() is None and len(started) == 1  # the first collection starts the first walk
    assert census.poll() is None and len(started) == 1  # one at a time
    started[0]()
    first = census.poll()
    assert isinstance(first, Census) and first.files == 1 and first.complete and len(started) == 1
    clock.advance(14)
    assert census.poll() is first and len(started) == 1  # not due yet
    clock.advance(1)
    (tmp_path / "g").write_bytes(b"x")
    assert census.poll() is first and len(started) == 2  # due: started, the old figures meanwhile
    started[1]()
    assert census.poll().files == 2  # type: ignore[union-attr]


def test_census_without_a_thread_tries_again_later(tmp_path: Path) -> None:
    clock = Clock()
    calls: list[int] = []

    def refuse(work: Callable[[], None]) -> None:
        calls.append(1)
        raise RuntimeError("can't start new thread")

    census = TrashCensus(str(tmp_path), start=refuse, clock=clock.seconds, interval=15)
    assert census.poll() is None and census.poll() is None and len(calls) == 1
    clock.advance(15)
    census.poll()
    assert len(calls) == 2


def test_census_on_a_worker_lane(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    lane = WorkerThread(global_reactor, "cachesvc-census", nice=19)
    lane.start()
    try:
        census = TrashCensus(str(tmp_path), on_lane(lane))
        census.poll()
        for _ in range(200):
            if census.last is not None:
                break
            time.sleep(0.01)
        assert census.last is not None and census.last.files == 1
    finally:
        lane.abandon()


@pytest_twisted.ensureDeferred
async def test_the_service_walks_the_trash_on_its_own_nice_19_lane(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The census is a worker thread PurgeService injects and starts: never a bare thread, and never
    behind the trash's deletes (its lanes run their drain loops for as long as the service runs) or a
    prefix scan or a purge (their lanes are kept busy here)."""
    root = tmp_path / "cache"
    root.mkdir()
    settings = check_purge(PurgeConfig(listen=f"unix:{tmp_path}/purge.sock", roots=[str(root)]))
    service = PurgeService(settings, global_reactor)
    walks: list[tuple[str, int]] = []

    def counted(path: str) -> tuple[int, int, bool]:
        walks.append((threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return 0, 0, True

    monkeypatch.setattr(purge_metrics, "count_tree", counted)
    registry = CollectorRegistry()
    register_purge_metrics(registry, service)
    release = threading.Event()
    service.startService()
    busy = [lane.submit(lambda: release.wait(10)) for lane in [service.lane, *service.scan_lanes]]
    try:
        generate_latest(registry)  # starts the first walk
        await _until(lambda: walks != [])
        after = check_exposition(generate_latest(registry))
        assert walks == [("cachesvc-census", 19)]
        assert value(after, "cachesvc_purge_trash_backlog_files") == 0
        assert not [t for t in threading.enumerate() if t.name == "cachesvc-trash-census"]
    finally:
        release.set()
        for d in busy:
            await d.addTimeout(10, global_reactor)
        await service.stopService().addTimeout(10, global_reactor)


# --- the warmer's counters ----------------------------------------------------------------------


def test_warm_counters_by_outcome_and_skipped_urls() -> None:
    warmer, agent, clock = make(concurrency=4, slow_response=2.0, max_entries=3)
    warmer.warm("/cache/example.com", [f"https://example.com/{i}" for i in range(5)])
    clock.advance(0)
    assert warmer.in_flight == 3 and warmer.pending == 0
    first, second, third = agent.open()
    first.answer(200)
    second.answer(503)
    clock.advance(3)
    third.answer(200)  # after 3 s: slow
    assert warmer.outcomes == {"warmed": 1, "slow": 1, "http_5xx": 1, "failed": 0}
    assert warmer.skipped_urls == 2  # over max_entries, counted once the warm-up has finished
    warmer.warm("/cache/example.com", ["https://example.com/x"])
    clock.advance(0)
    clock.advance(11)  # the timeout
    assert warmer.outcomes["failed"] == 1


# --- a whole purge service in the test's reactor -----------------------------------------------


def _until(check: Callable[[], Any], timeout: float = 10.0) -> Deferred[None]:
    async def wait() -> None:
        deadline = global_reactor.seconds() + timeout
        while not check():
            assert global_reactor.seconds() < deadline, "condition not met in time"
            await deferLater(global_reactor, 0.02, lambda: None)

    return Deferred.fromCoroutine(wait())


def key(path: str) -> str:
    return f"httpGET{HOST}{path}"


@pytest_twisted.ensureDeferred
async def test_scrape_after_purges_of_every_form(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    zone = root / HOST
    zone.mkdir(parents=True)
    for path in ("/a", "/p1", "/p2", "/s"):
        write_entry(zone, key(path))
    for i in range(3):
        write_entry(zone, key(f"/tagged{i}"), headers="X-Cache-Tags: post-1 home\r\n")
    closed = free_port()  # warm requests are refused: counted as failed
    settings = check_purge(PurgeConfig(
        listen=f"unix:{tmp_path}/purge.sock", roots=[str(root)],
        zones=[ZoneConfig(hosts=[HOST], path=f"{root}/{{host}}")],
        warm=WarmConfig(enabled=True, origins=WarmOrigins(http=f"http://127.0.0.1:{closed}")),
        tags=TagsConfig(enabled=True),
    ))
    service = PurgeService(settings, global_reactor)
    registry = process_registry()
    Metrics(registry=registry)  # the recache half's names on the same registry, as the daemon has them
    started: list[Callable[[], None]] = []
    census = TrashCensus(settings.trash_dir, start=started.append)
    register_purge_metrics(registry, service, census=census)
    service.startService()
    try:
        assert service.tags is not None and service.warmer is not None
        await _until(lambda: str(zone) in service.tags.indexes and service.tags.indexes[str(zone)].whole)
        before = check_exposition(generate_latest(registry))
        assert value(before, "cachesvc_purge_tag_index_entries", zone=str(zone)) == 3
        assert value(before, "cachesvc_purge_tag_index_tags", zone=str(zone)) == 2
        assert value(before, "cachesvc_purge_tag_index_whole", zone=str(zone)) == 1
        assert value(before, "cachesvc_purge_tag_index_scans_total", zone=str(zone)) == 1
        assert "cachesvc_purge_trash_backlog_files" not in before  # no walk has finished yet
        lines = [
            f"http://{HOST}/a", f"http://{HOST}/p*", f"soft:http://{HOST}/s", f"tag:{zone} post-1",
            "/etc/passwd", f"{zone}/0", str(zone),
        ]
        answers = [await service.purger.purge(line.encode()).addTimeout(30, global_reactor) for line in lines]
        assert answers == [True, True, True, True, False, True, True]
        await _until(lambda: service.trash.backlog == 0 and not service.warmer.in_flight
                     and not service.warmer.pending)
        for walk in started:
            walk()
        after = check_exposition(generate_latest(registry))
    finally:
        await service.stopService().addTimeout(10, global_reactor)

    def requests(form: str, mode: str, outcome: str) -> float | None:
        return value(after, "cachesvc_purge_requests_total", form=form, mode=mode, outcome=outcome)

    assert requests("url", "hard", "deleted") == 1
    assert requests("prefix", "hard", "deleted") == 1
    assert requests("url", "soft", "marked") == 1
    assert requests("tag", "hard", "deleted") == 1
    assert requests("path", "hard", "refused") == 1
    assert requests("path", "hard", "absent") == 1  # f"{zone}/0": no such directory
    assert requests("path", "hard", "deleted") == 1  # the site purge
    assert sum(after["cachesvc_purge_requests_total"].values()) == len(lines)
    assert value(after, "cachesvc_purge_entries_total", mode="soft") == 1
    assert value(after, "cachesvc_purge_entries_total", mode="hard") >= 1 + 2 + 3  # type: ignore[operator]
    for form, count in (("url", 2), ("prefix", 1), ("tag", 1), ("path", 3)):
        assert value(after, "cachesvc_purge_duration_seconds_count", form=form) == count
        assert value(after, "cachesvc_purge_duration_seconds_bucket", form=form, le="+Inf") == count
    assert value(after, "cachesvc_purge_trash_backlog_directories") == 0
    assert value(after, "cachesvc_purge_trash_backlog_files") == 0  # deleted by the time it was walked
    assert value(after, "cachesvc_purge_trash_census_complete") == 1
    assert value(after, "cachesvc_purge_connections") == 0
    assert value(after, "cachesvc_purge_connections_max") == settings.max_connections
    assert value(after, "cachesvc_purge_tag_index_entries", zone=str(zone)) == 0  # tagged ones purged, zone too
    failed = value(after, "cachesvc_warm_requests_total", outcome="failed")
    assert failed is not None and failed >= 1
    assert value(after, "cachesvc_warm_requests_total", outcome="warmed") == 0
    assert value(after, "cachesvc_warm_concurrency_max") == settings.warm.concurrency
    assert value(after, "cachesvc_warm_concurrency_limit") == 1  # halved by the refusals
    assert value(after, "cachesvc_warm_in_flight_requests") == 0 and value(after, "cachesvc_warm_pending_urls") == 0
    assert value(after, "edgecomet_cd_in_flight") == 0  # the EdgeComet names as they were
    assert value(after, "process_open_fds") and value(after, "process_start_time_seconds")
    assert "python_info" in after


def test_warm_and_tag_series_only_when_they_are_on(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    settings = check_purge(PurgeConfig(listen=f"unix:{tmp_path}/purge.sock", roots=[str(root)]))
    service = PurgeService(settings, global_reactor)
    registry = CollectorRegistry()
    register_purge_metrics(registry, service, census=TrashCensus(settings.trash_dir, start=lambda work: work()))
    samples = check_exposition(generate_latest(registry))
    assert not [name for name in samples if name.startswith(("cachesvc_warm_", "cachesvc_purge_tag_index_"))]
    assert value(samples, "cachesvc_purge_trash_backlog_files") == 0  # the trash does not exist yet
    assert not [name for name in samples if name.startswith(("process_", "python_"))]  # the registry's choice
