"""Soft purges against a real nginx FastCGI cache (issue 10): entries are marked expired, not deleted.

With ``fastcgi_cache_use_stale updating`` + ``fastcgi_cache_background_update on`` the next request
is ``STALE`` with the old page while nginx refreshes it, then a ``HIT`` with the new one, and no
request along the way is a ``MISS``; without them the next request is ``EXPIRED`` with the new page.
Every case runs in both ``use_temp_path`` modes. Anything in a soft target that is not a valid cache
file is removed; a symlink is removed as a link, never written through.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.nginx import OK, Site, Stack, cache_files, entry_bytes, page_number, set_valid_sec, valid_sec

TEMP = {"on": True, "off": False}


def sites(prefix: str, stale: bool, mode: str | None = None) -> list[Site]:
    return [Site(f"{prefix}-{t}.example", stale=stale, use_temp_path=on, mode=mode) for t, on in TEMP.items()]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """Stale zones (s-), plain zones (p-) and stale zones whose daemon config says ``mode: soft`` (z-)."""
    with Stack(sites("s", stale=True) + sites("p", stale=False) + sites("z", stale=True, mode="soft")) as stack:
        yield stack


@pytest.fixture(scope="module")
def soft_default() -> Iterator[Stack]:
    """Stale zones under a daemon whose ``purge.mode`` is ``soft``."""
    with Stack(sites("g", stale=True), purge_yaml="mode: soft") as stack:
        yield stack


@pytest.fixture(params=list(TEMP), ids=[f"use_temp_path={t}" for t in TEMP])
def temp(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def cached(stack: Stack, host: str, paths: list[str]) -> dict[str, str]:
    """Make every path a HIT; their bodies."""
    return {path: stack.until_hit(host, path) for path in paths}


def assert_stale_then_hit(stack: Stack, host: str, old: dict[str, str]) -> None:
    """Each path: the next request STALE with the old body; after nginx's refresh, a HIT with a new one."""
    inodes = {path: stack.file(host, path).stat().st_ino for path in old}
    for path in old:
        assert valid_sec(stack.file(host, path)) < time.time(), f"{host}{path} not marked expired on disk"
        assert stack.file(host, path).stat().st_ino == inodes[path], f"{host}{path} replaced, not marked"
    for path, body in old.items():
        assert stack.get(host, path) == ("STALE", body), f"{host}{path}: the request after the soft purge"
    for path, body in old.items():
        stack.wait_fresh(host, path)
        seen = []
        while not seen or seen[-1][0] != "HIT":
            seen.append(stack.get(host, path))
            assert len(seen) < 50, f"{host}{path} never a HIT after the refresh: {seen}"
        assert all(status in ("HIT", "UPDATING", "STALE") for status, _ in seen), f"{host}{path}: {seen}"
        assert page_number(seen[-1][1]) > page_number(body), f"{host}{path}: the HIT still has the old body"


def assert_still_hits(stack: Stack, host: str, kept: dict[str, str]) -> None:
    for path, body in kept.items():
        assert stack.get(host, path) == ("HIT", body), f"{host}{path} is not a target and must stay a HIT"


# --- stale zones: URL, prefix, site ---------------------------------------------------------------


def test_soft_url_purge(stack: Stack, temp: str) -> None:
    host = f"s-{temp}.example"
    old, kept = cached(stack, host, ["/post"]), cached(stack, host, ["/other"])
    assert stack.purge(f"soft:http://{host}/post") == OK
    assert_still_hits(stack, host, kept)
    assert_stale_then_hit(stack, host, old)
    assert_still_hits(stack, host, kept)


def test_soft_prefix_purge(stack: Stack, temp: str) -> None:
    host = f"s-{temp}.example"
    old, kept = cached(stack, host, ["/blog/1", "/blog/2?page=2"]), cached(stack, host, ["/shop/1"])
    kept_valid = valid_sec(stack.file(host, "/shop/1"))
    assert stack.purge(f"soft:http://{host}/blog/*") == OK
    assert valid_sec(stack.file(host, "/shop/1")) == kept_valid
    assert_still_hits(stack, host, kept)
    assert_stale_then_hit(stack, host, old)


def test_soft_site_purge(stack: Stack, temp: str) -> None:
    host = f"s-{temp}.example"
    zone = stack.zone(host)
    old = cached(stack, host, ["/a", "/b", "/c?x=1"])
    other = cached(stack, f"p-{temp}.example", ["/elsewhere"])
    mode, owner = zone.stat().st_mode, zone.stat().st_uid
    assert stack.purge(f"soft:{zone}") == OK
    assert zone.is_dir() and (zone.stat().st_mode, zone.stat().st_uid) == (mode, owner)
    assert all(valid_sec(f) < time.time() for f in cache_files(zone)), "an entry of the zone left fresh"
    assert_still_hits(stack, f"p-{temp}.example", other)
    assert_stale_then_hit(stack, host, old)


def test_plain_site_purge_on_a_soft_zone_is_soft(stack: Stack, temp: str) -> None:
    """The SpinupWP plugin's own line, ``/cache/<domain>``, on a zone whose config says ``mode: soft``."""
    host = f"z-{temp}.example"
    old = cached(stack, host, ["/a", "/b?x=1"])
    assert stack.purge(f"{stack.zone(host)}") == OK
    assert_stale_then_hit(stack, host, old)


def test_hard_lines_delete_on_a_soft_zone(stack: Stack, temp: str) -> None:
    host = f"z-{temp}.example"
    cached(stack, host, ["/gone", "/gone2", "/kept"])
    assert stack.purge(f"hard:http://{host}/gone") == OK
    assert not stack.file(host, "/gone").exists()
    assert stack.status(host, "/gone") == "MISS"
    assert stack.purge(f"hard:{stack.zone(host)}") == OK
    assert cache_files(stack.zone(host)) == []
    assert stack.status(host, "/gone2") == "MISS"
    assert stack.status(host, "/kept") == "MISS"


def test_hard_zone_default_is_unchanged(stack: Stack, temp: str) -> None:
    """A zone with no ``mode:`` under the default ``purge.mode`` (hard): a plain line still deletes."""
    host = f"s-{temp}.example"
    cached(stack, host, ["/hard"])
    assert stack.purge(f"http://{host}/hard") == OK
    assert not stack.file(host, "/hard").exists()
    assert stack.status(host, "/hard") == "MISS"


# --- plain zones: EXPIRED -------------------------------------------------------------------------


def test_soft_purge_without_use_stale_is_expired_with_the_new_body(stack: Stack, temp: str) -> None:
    host = f"p-{temp}.example"
    old = cached(stack, host, ["/x", "/y?z=1"])
    url_old = cached(stack, host, ["/url"])
    assert stack.purge(f"soft:{stack.zone(host)}") == OK
    assert stack.purge(f"soft:http://{host}/url") == OK  # already marked by the site purge: still a success
    for path, body in {**old, **url_old}.items():
        status, new = stack.get(host, path)
        assert status == "EXPIRED", f"{host}{path}: {status}"
        assert page_number(new) > page_number(body)
        assert stack.get(host, path) == ("HIT", new)


# --- what a soft target holds besides cache entries ---------------------------------------------


def test_non_cache_and_temp_files_in_a_soft_site_target_are_removed(stack: Stack, temp: str) -> None:
    host = f"s-{temp}.example"
    zone = stack.zone(host)
    old = cached(stack, host, ["/real"])

    def plant(relative: str, content: bytes) -> Path:
        return stack.plant(zone / relative, content)

    v4 = bytearray(entry_bytes(f"httpGET{host}/v4"))
    v4[0] = 4
    junk = [
        plant("a/bc/" + "1" * 29 + "bca", b"hello"),  # too short for a header
        plant("a/bc/" + "2" * 29 + "bca", bytes(v4)),  # wrong version
        plant("a/bc/" + "3" * 29 + "bca.0000000001", entry_bytes(f"httpGET{host}/tmp")),  # a temp file
        plant("a/bc/" + "4" * 29 + "bca.1234567890", b"partial"),
        plant("notes.txt", b"a note"),
        plant("f/0e/readme", b"not a cache file"),
    ]
    assert stack.purge(f"soft:{zone}") == OK
    left = [str(p.relative_to(zone)) for p in junk if os.path.lexists(p)]
    assert left == [], f"left in a soft target: {left}"
    assert_stale_then_hit(stack, host, old)


def test_a_non_cache_file_at_a_soft_url_target_is_removed(stack: Stack, temp: str) -> None:
    host = f"s-{temp}.example"
    target = stack.file(host, "/junk")
    stack.plant(target, b"<html>not a cache file</html>")
    assert stack.purge(f"soft:http://{host}/junk") == OK
    assert not os.path.lexists(target)
    assert stack.status(host, "/junk") == "MISS"


def outside_entry(stack: Stack, name: str) -> tuple[Path, bytes, int]:
    """A fresh v5 entry outside every root, mtime set in the past: (path, bytes, mtime_ns)."""
    outside = stack.base / "outside" / name
    outside.parent.mkdir(parents=True, exist_ok=True)
    data = entry_bytes(f"httpGETelsewhere/{name}")
    outside.write_bytes(data)
    mtime = (int(time.time()) - 3600) * 10**9
    os.utime(outside, ns=(mtime, mtime))
    return outside, data, mtime


def assert_untouched(path: Path, data: bytes, mtime: int) -> None:
    assert path.read_bytes() == data, f"{path} was written through a symlink"
    assert path.stat().st_mtime_ns == mtime, f"{path} was written through a symlink (mtime changed)"


def test_symlinks_in_a_soft_site_target_are_removed_not_followed(stack: Stack, temp: str) -> None:
    host = f"s-{temp}.example"
    zone = stack.zone(host)
    old = cached(stack, host, ["/beside-links"])
    file_target, file_data, file_mtime = outside_entry(stack, f"file-{temp}")
    dir_target, dir_data, dir_mtime = outside_entry(stack, f"dir-{temp}/" + "5" * 29 + "e9c")
    stack.dirs(zone / "c" / "9e")
    file_link = zone / "c" / "9e" / ("6" * 29 + "9ec")
    file_link.symlink_to(file_target)
    dir_link = zone / "linked-dir"
    dir_link.symlink_to(dir_target.parent, target_is_directory=True)
    assert stack.purge(f"soft:{zone}") == OK
    assert not os.path.lexists(file_link) and not os.path.lexists(dir_link)
    assert_untouched(file_target, file_data, file_mtime)
    assert_untouched(dir_target, dir_data, dir_mtime)
    assert_stale_then_hit(stack, host, old)


def test_a_symlink_at_a_soft_url_target_is_removed_not_followed(stack: Stack, temp: str) -> None:
    host = f"s-{temp}.example"
    target, data, mtime = outside_entry(stack, f"url-{temp}")
    link = stack.file(host, "/linked")
    stack.dirs(link.parent)
    link.symlink_to(target)
    assert stack.purge(f"soft:http://{host}/linked") == OK
    assert not os.path.lexists(link)
    assert_untouched(target, data, mtime)


def test_a_soft_purge_leaves_an_expired_entry_as_it_is(stack: Stack, temp: str) -> None:
    host = f"s-{temp}.example"
    cached(stack, host, ["/old"])
    path = stack.file(host, "/old")
    set_valid_sec(path, int(time.time()) - 600)
    mtime = (int(time.time()) - 300) * 10**9
    os.utime(path, ns=(mtime, mtime))
    before = path.read_bytes(), path.stat().st_ino
    assert stack.purge(f"soft:http://{host}/old") == OK
    assert (path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns) == (*before, mtime)
    assert stack.purge(f"soft:{stack.zone(host)}") == OK
    assert (path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns) == (*before, mtime)


# --- purge.mode: soft -------------------------------------------------------------------------------


def test_soft_default_makes_plain_lines_soft(soft_default: Stack, temp: str) -> None:
    stack, host = soft_default, f"g-{temp}.example"
    old = cached(stack, host, ["/a", "/b"])
    assert stack.purge(f"{stack.zone(host)}") == OK
    assert_stale_then_hit(stack, host, old)
    old = cached(stack, host, ["/url"])
    assert stack.purge(f"http://{host}/url") == OK
    assert_stale_then_hit(stack, host, old)


def test_hard_prefix_overrides_the_soft_default(soft_default: Stack, temp: str) -> None:
    stack, host = soft_default, f"g-{temp}.example"
    cached(stack, host, ["/c", "/d?x=1"])
    assert stack.purge(f"hard:{stack.zone(host)}") == OK
    assert cache_files(stack.zone(host)) == []
    assert stack.status(host, "/c") == "MISS"
    assert stack.status(host, "/d?x=1") == "MISS"
    stack.until_hit(host, "/c")
    assert stack.purge(f"hard:http://{host}/c") == OK
    assert not stack.file(host, "/c").exists()
    assert stack.status(host, "/c") == "MISS"
