"""Soft purges in-process: the header rewrite, the walk's per-file decisions, modes, and the keys a purge gathers."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from cachesvc.configfile import ConfigError, build
from cachesvc.purge import cachefile
from cachesvc.purge.config import PurgeConfig, ZoneConfig, check_purge, check_zone
from cachesvc.purge.deleter import Deleted, delete_now
from cachesvc.purge.harvest import Gathering, Harvest
from cachesvc.purge.nginxcache import PrefixScanner, ScanResult, WalkRequest, walk_tree
from cachesvc.purge.paths import PathPolicy, PurgeTarget, Refused
from cachesvc.purge.purger import Purger, split_mode
from cachesvc.purge.zones import ZoneMap
from harness.nginxfiles import FRESH_UNTIL, valid_sec, write_entry

NOW = 1_800_000_000


class Now:
    """A reactor stand-in for Harvest: calls from threads run at once."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


# --- the header ---------------------------------------------------------------------------------------


def test_header_is_nginx_version_5_layout() -> None:
    head = cachefile.pack_header(123, 456, b"httpsGETexample.com/")
    assert cachefile.HEADER_SIZE == 336
    assert head[:8] == (5).to_bytes(8, "little")
    assert head[8:16] == (123).to_bytes(8, "little")
    assert head[40:48] == (456).to_bytes(8, "little")
    assert head[336:] == b"\nKEY: httpsGETexample.com/\n"
    body_start = int.from_bytes(head[56:58], "little")
    assert body_start == len(head)
    assert cachefile.parse(head) == cachefile.Entry(123, 456, b"httpsGETexample.com/")


@pytest.mark.parametrize(
    "head",
    [
        b"",
        cachefile.pack_header(1, 1, b"k")[:300],  # too short
        (4).to_bytes(8, "little") + cachefile.pack_header(1, 1, b"k")[8:],  # another version
        cachefile.pack_header(1, 1, b"k")[:336] + b"\nKEX: k\n",  # no key line where nginx puts it
    ],
    ids=["empty", "short", "version-4", "no-key-line"],
)
def test_what_is_not_a_version_5_cache_file(head: bytes) -> None:
    assert cachefile.parse(head) is None


def test_expire_writes_eight_bytes_in_the_past_and_nothing_else(tmp_path: Path) -> None:
    path = write_entry(tmp_path / "z", "httpGETa/x", valid_sec=FRESH_UNTIL)
    before = path.read_bytes()
    fd = os.open(path, os.O_RDWR)
    try:
        cachefile.expire(fd, NOW + 0.9)
    finally:
        os.close(fd)
    after = path.read_bytes()
    assert valid_sec(path) == NOW - cachefile.PAST < NOW
    assert after[:8] == before[:8] and after[16:] == before[16:]


def test_long_keys_are_read_past_the_first_read(tmp_path: Path) -> None:
    key = "httpGETa/" + "x" * 5000
    path = write_entry(tmp_path / "z", key)
    fd = os.open(path, os.O_RDONLY)
    try:
        entry = cachefile.parse(cachefile.read_head(fd))
    finally:
        os.close(fd)
    assert entry is not None and entry.key == key.encode()


# --- the walk -----------------------------------------------------------------------------------------


def zone_target(root: Path, name: str = "example.com") -> PurgeTarget:
    return PathPolicy([str(root)]).target(f"{root}/{name}".encode())


def test_soft_walk_marks_fresh_entries_and_leaves_expired_ones(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    zone = root / "example.com"
    fresh = [write_entry(zone, f"httpGETexample.com/{i}") for i in range(5)]
    expired = write_entry(zone, "httpGETexample.com/old", valid_sec=NOW - 100)
    old_bytes = expired.read_bytes()
    [result] = walk_tree(zone_target(root), [WalkRequest(None, "soft")], NOW)
    assert (result.scanned, result.marked, result.deleted) == (6, 5, 0)
    assert all(valid_sec(p) < NOW for p in fresh)
    assert expired.read_bytes() == old_bytes  # left as it was
    assert all(p.exists() for p in fresh)


def test_soft_walk_deletes_what_is_not_a_cache_file(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    zone = root / "example.com"
    entry = write_entry(zone, "httpGETexample.com/kept")
    level = entry.parent
    junk = level / "0123456789abcdef0123456789abcdef"
    junk.write_bytes(b"<html>no header</html>")
    temp = level / (entry.name + ".0000000042")  # nginx's temp file beside the entry (use_temp_path=off)
    temp.write_bytes(entry.read_bytes())
    v4 = level / "fedcba9876543210fedcba9876543210"
    v4.write_bytes((4).to_bytes(8, "little") + entry.read_bytes()[8:])
    [result] = walk_tree(zone_target(root), [WalkRequest(None, "soft")], NOW)
    assert (result.marked, result.deleted) == (1, 3)
    assert entry.exists() and valid_sec(entry) < NOW
    assert not junk.exists() and not temp.exists() and not v4.exists()


def test_soft_walk_unlinks_symlinks_and_never_writes_through_them(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    zone = root / "example.com"
    write_entry(zone, "httpGETexample.com/a")
    outside = write_entry(tmp_path / "outside", "httpGETelsewhere/x")
    before, mtime = outside.read_bytes(), outside.stat().st_mtime_ns
    (zone / "0123456789abcdef0123456789abcdef").symlink_to(outside)
    (zone / "dirlink").symlink_to(outside.parent)
    [result] = walk_tree(zone_target(root), [WalkRequest(None, "soft")], NOW)
    assert result.deleted == 2 and result.marked == 1
    assert outside.read_bytes() == before and outside.stat().st_mtime_ns == mtime
    assert not os.path.lexists(zone / "0123456789abcdef0123456789abcdef") and not os.path.lexists(zone / "dirlink")


def test_soft_walk_of_a_single_file_and_of_a_symlink_target(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    entry = write_entry(root / "example.com", "httpGETexample.com/one")
    outside = write_entry(tmp_path / "outside", "httpGETelsewhere/x")
    before = outside.read_bytes()
    policy = PathPolicy([str(root)])
    [one] = walk_tree(policy.target(str(entry).encode()), [WalkRequest(None, "soft")], NOW)
    assert (one.scanned, one.marked) == (1, 1) and valid_sec(entry) < NOW
    link = root / "example.com" / "link"
    link.symlink_to(outside)
    [gone] = walk_tree(policy.target(str(link).encode()), [WalkRequest(None, "soft")], NOW)
    assert gone.deleted == 1 and not os.path.lexists(link) and outside.read_bytes() == before


def test_a_soft_walk_below_a_symlink_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    outside = write_entry(tmp_path / "outside" / "zone", "httpGETelsewhere/x")
    (root / "example.com").symlink_to(tmp_path / "outside")
    with pytest.raises(Refused, match="symlink"):
        walk_tree(PathPolicy([str(root)]).target(f"{root}/example.com/zone".encode()), [WalkRequest(None, "soft")], NOW)
    assert valid_sec(outside) == FRESH_UNTIL


def test_one_walk_hard_wins_over_soft_and_each_counts_its_own(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    zone = root / "example.com"
    blog = [write_entry(zone, f"httpGETexample.com/blog/{i}") for i in range(3)]
    shop = [write_entry(zone, f"httpGETexample.com/shop/{i}") for i in range(2)]
    soft_all, hard_blog = WalkRequest(None, "soft"), WalkRequest((b"httpGETexample.com/blog/",), "hard")
    results = walk_tree(zone_target(root), [soft_all, hard_blog], NOW)
    assert [(r.marked, r.deleted) for r in results] == [(2, 3), (0, 3)]
    assert not any(p.exists() for p in blog) and all(valid_sec(p) < NOW for p in shop)


def test_soft_prefix_walk_marks_only_matching_keys_and_skips_junk(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    zone = root / "example.com"
    blog = write_entry(zone, "httpGETexample.com/blog/1")
    shop = write_entry(zone, "httpGETexample.com/shop/1")
    junk = zone / "junk"
    junk.write_bytes(b"not a cache file")
    [result] = walk_tree(zone_target(root), [WalkRequest((b"httpGETexample.com/blog/",), "soft")], NOW)
    assert (result.marked, result.deleted) == (1, 0)
    assert valid_sec(blog) < NOW and valid_sec(shop) == FRESH_UNTIL and junk.exists()


# --- harvests -------------------------------------------------------------------------------------------


def test_harvest_keeps_the_most_recent_up_to_its_limit() -> None:
    got: list[Any] = []
    harvest = Harvest(3, lambda entries, seen: got.append((entries, seen)), Now())
    for date in [5, 1, 9, 7, 3]:
        harvest.record(date, f"k{date}".encode())
    harvest.finish()
    harvest.finish()  # once only
    assert got == [([(9, b"k9"), (7, b"k7"), (5, b"k5")], 5)]


def test_walks_and_deletions_harvest_what_they_purge(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    zone = root / "example.com"
    for i in range(3):
        write_entry(zone, f"httpGETexample.com/{i}", date=100 + i)
    write_entry(zone, "httpGETexample.com/old", valid_sec=NOW - 1, date=1)  # expired: not marked, not warmed
    got: list[Any] = []
    harvest = Harvest(10, lambda entries, seen: got.append(entries), Now())
    walk_tree(zone_target(root), [WalkRequest(None, "soft", harvest)], NOW)
    harvest.finish()
    assert [k for _, k in got[0]] == [b"httpGETexample.com/2", b"httpGETexample.com/1", b"httpGETexample.com/0"]
    deleted: list[Any] = []
    hard = Harvest(10, lambda entries, seen: deleted.append(entries), Now())
    assert delete_now(zone_target(root), None, hard) == Deleted("deleted", 4)
    assert len(deleted) == 1 and len(deleted[0]) == 4  # finished by the deletion itself


def test_a_gathering_turns_keys_into_urls_newest_first_and_counts_the_rest() -> None:
    out: list[Any] = []
    gathering = Gathering(10, Now(), lambda urls, skipped: out.append((urls, skipped)))
    a = gathering.harvest(lambda key: "http://" + key[7:] if key.startswith("httpGET") else None)
    b = gathering.harvest(lambda key: "https://" + key[8:] if key.startswith("httpsGET") else None)
    a.record(1, b"httpGETa.example/old")
    a.record(3, b"httpHEADa.example/")  # not a GET entry
    b.record(2, b"httpsGETb.example/new")
    a.finish()
    gathering.seal()
    assert out == []  # b still open
    b.finish()
    assert out == [(["https://b.example/new", "http://a.example/old"], 1)]


# --- modes --------------------------------------------------------------------------------------------


def test_split_mode() -> None:
    assert split_mode(b"soft:/cache/x") == ("soft", b"/cache/x")
    assert split_mode(b"hard:https://a/*") == ("hard", b"https://a/*")
    assert split_mode(b"/cache/soft:x") == (None, b"/cache/soft:x")
    assert split_mode(b"SOFT:/cache/x") == (None, b"SOFT:/cache/x")


class Recorder:
    """A deleter and a scanner that record what they are asked and answer at once."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def delete(self, target: PurgeTarget, harvest: Any = None) -> Deferred[Deleted]:
        self.calls.append(("hard", target.path, None))
        return succeed(Deleted("deleted", 1))

    def scan(self, zone: PurgeTarget, prefixes: Any, mode: str = "hard", harvest: Any = None) -> Deferred[ScanResult]:
        self.calls.append((mode, zone.path, prefixes))
        return succeed(ScanResult(1, 0, 0.0, 1 if mode == "soft" else 0))


def purger(mode: str = "hard", zone_mode: str | None = None) -> tuple[Purger, Recorder]:
    policy = PathPolicy(["/cache"])
    zones = [
        check_zone(
            ZoneConfig(hosts=["soft.example"], path="/cache/soft.example", mode=zone_mode or "soft"), ["/cache"]
        ),
        check_zone(ZoneConfig(hosts=["*"], path="/cache/{host}"), ["/cache"], mode),
    ]
    recorder = Recorder()
    scanner: Any = recorder
    return Purger(policy, recorder, Clock(), ZoneMap(zones, policy), scanner, mode=mode), recorder  # type: ignore[arg-type]


def answer(p: Purger, line: bytes) -> bool:
    out: list[bool] = []
    p.purge(line).addCallback(out.append)
    return out[0]


def test_line_prefixes_choose_the_mode_and_the_default_is_hard() -> None:
    p, rec = purger()
    assert answer(p, b"/cache/a.example")
    assert answer(p, b"soft:/cache/a.example")
    assert answer(p, b"soft:https://a.example/blog/*")
    assert answer(p, b"soft:http://a.example/page")
    assert rec.calls[0] == ("hard", "/cache/a.example", None)
    assert rec.calls[1] == ("soft", "/cache/a.example", None)
    assert rec.calls[2] == ("soft", "/cache/a.example", [b"httpsGETa.example/blog/", b"httpsHEADa.example/blog/"])
    assert rec.calls[3][0] == "soft" and rec.calls[3][2] is None and rec.calls[3][1].startswith("/cache/a.example/")


def test_a_soft_zone_makes_plain_lines_soft_and_hard_overrides_it() -> None:
    p, rec = purger()
    assert answer(p, b"/cache/soft.example")
    assert answer(p, b"/cache/soft.example/5/cd/ee80e68666834decf6fe00921710ccd5")
    assert answer(p, b"hard:/cache/soft.example")
    assert [c[0] for c in rec.calls] == ["soft", "soft", "hard"]


def test_purge_mode_soft_applies_everywhere_unless_a_zone_or_line_says_otherwise() -> None:
    p, rec = purger(mode="soft", zone_mode="hard")
    assert answer(p, b"/cache/a.example")
    assert answer(p, b"/cache/soft.example")
    assert answer(p, b"hard:/cache/a.example")
    assert answer(p, b"/cache/nozone")  # in the "*" zone too
    assert [c[0] for c in rec.calls] == ["soft", "hard", "hard", "soft"]


@pytest.mark.parametrize("line", [b"soft:", b"soft:relative", b"hard:soft:/cache/x", b"soft:/etc/passwd", b"soft:ftp://x/"])
def test_bad_lines_after_a_mode_are_refused(line: bytes) -> None:
    p, rec = purger()
    assert answer(p, line) is False
    assert rec.calls == []


def test_soft_purges_without_a_scanner_are_refused() -> None:
    policy = PathPolicy(["/cache"])
    p = Purger(policy, Recorder(), Clock())  # type: ignore[arg-type]
    assert answer(p, b"soft:/cache/a.example") is False


def test_concurrent_soft_purges_of_one_path_share_one_walk(tmp_path: Path) -> None:
    class Lane:
        def __init__(self) -> None:
            self.jobs: list[Any] = []

        def submit(self, f: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            self.jobs.append((f, d))
            return d

    lane = Lane()
    policy = PathPolicy([str(tmp_path)])
    p = Purger(policy, Recorder(), Clock(), scanner=PrefixScanner([lane], None))  # type: ignore[list-item, arg-type]
    out: list[bool] = []
    for _ in range(3):
        p.purge(f"soft:{tmp_path}/a".encode()).addCallback(out.append)
    assert len(lane.jobs) == 1
    f, d = lane.jobs[0]
    d.callback(f())
    assert out == [True, True, True]


# --- config ---------------------------------------------------------------------------------------------


def config(tmp_path: Path, **purge: Any) -> Any:
    return check_purge(build(PurgeConfig, {"roots": [str(tmp_path)], **purge}, "purge"))


def test_modes_and_warm_settings_are_read(tmp_path: Path) -> None:
    settings = config(
        tmp_path, mode="soft",
        zones=[{"hosts": ["a"], "path": f"{tmp_path}/a", "mode": "hard"}, {"hosts": ["b"], "path": f"{tmp_path}/b"}],
        warm={"enabled": True, "origins": {"http": "http://127.0.0.1:8080/", "https": "https://[::1]"},
              "concurrency": 2, "delay": "1s"},
    )
    assert settings.mode == "soft" and [z.mode for z in settings.zones] == ["hard", "soft"]
    assert settings.warm.enabled and settings.warm.concurrency == 2 and settings.warm.delay == 1.0
    assert settings.warm.origin("http") == "http://127.0.0.1:8080"
    assert settings.warm.origin("https") == "https://[::1]:443"
    assert config(tmp_path).mode == "hard" and not config(tmp_path).warm.enabled


@pytest.mark.parametrize(
    ("purge", "message"),
    [
        ({"mode": "lazy"}, "purge.mode: 'lazy' is not a purge mode; use hard"),
        ({"zones": [{"hosts": ["a"], "path": "{root}/a", "mode": "SOFT"}]}, "purge.zones[0]: mode: 'SOFT'"),
        ({"warm": {"origins": {"http": "https://127.0.0.1"}}}, "purge.warm.origins.http: 'https://127.0.0.1'"),
        ({"warm": {"origins": {"https": "https://127.0.0.1/path"}}}, "with no path, e.g. https://127.0.0.1:443"),
        ({"warm": {"origins": {"http": "http://127.0.0.1:99999"}}}, "is not an origin"),
        ({"warm": {"origins": {"ftp": "ftp://x"}}}, "purge.warm.origins.ftp: unknown configuration field"),
        ({"warm": {"concurrency": 0}}, "purge.warm.concurrency: 0 is out of range"),
        ({"warm": {"max_entries": -1}}, "purge.warm.max_entries: -1 is out of range"),
        ({"warm": {"slow_response": 0}}, "purge.warm.slow_response: must be more than 0s"),
        ({"warm": {"delay": "-1s"}}, "purge.warm.delay"),
        ({"warm": {"enabled": "yes"}}, "purge.warm.enabled: expected true or false"),
    ],
)
def test_bad_mode_and_warm_settings_say_what_and_how(tmp_path: Path, purge: dict[str, Any], message: str) -> None:
    if "zones" in purge:
        purge["zones"][0]["path"] = purge["zones"][0]["path"].replace("{root}", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        config(tmp_path, **purge)
    assert message in str(caught.value)


def test_zone_of_finds_the_zone_holding_a_path() -> None:
    policy = PathPolicy(["/cache"])
    zones = ZoneMap(
        [check_zone(ZoneConfig(hosts=["*"], path="/cache/{host}/fastcgi"), ["/cache"]),
         check_zone(ZoneConfig(hosts=["x"], path="/cache/plain"), ["/cache"])],
        policy,
    )
    assert zones.zone_of(policy.target(b"/cache/a.example/fastcgi/5/cd")) is zones.zones[0]
    assert zones.zone_of(policy.target(b"/cache/a.example/fastcgi")) is zones.zones[0]
    assert zones.zone_of(policy.target(b"/cache/a.example/fastcgix")) is None
    assert zones.zone_of(policy.target(b"/cache/plain")) is zones.zones[1]
    assert zones.zone_of(policy.target(b"/cache/a.example")) is None


def test_time_is_whole_seconds_in_the_past() -> None:
    """valid_sec is compared with nginx's cached clock in whole seconds: PAST keeps it behind."""
    now = time.time()
    assert int(now) - cachefile.PAST < int(now - 0.999)
