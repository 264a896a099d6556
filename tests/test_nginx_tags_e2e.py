"""Tag purges against Debian's nginx and ``twistd cachesvc`` (issue 11), the way a site uses them.

The origin labels each page with ``X-Cache-Tags`` (and sometimes ``Cache-Tag`` too), nginx hides it
from visitors (``fastcgi_hide_header X-Cache-Tags;``) and stores it in the cache file, and the
daemon, with ``purge.tags.enabled``, answers ``tag:<zone> <tags>``: exactly the pages carrying one
of the tags become a MISS (``STALE`` when soft, with ``use_stale updating`` and
``background_update on``), every other page stays a HIT. Both ``use_temp_path`` modes.
"""

from __future__ import annotations

import http.client
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from harness.fastcgi import FastCGIServer
from harness.nginx import ERROR, OK, Site, Stack, entry_bytes, page_number, valid_sec
from tests.test_nginx_soft_e2e import assert_stale_then_hit
from tests.test_tags import TagStack

TAGS_YAML = "tags:\n  enabled: true\n"
TEMP = {"on": True, "off": False}
RETAGGED: dict[str, str] = {}
"""URI → the tags the origin sends for it from now on, instead of those in its query."""


def origin_tags(uri: str) -> list[tuple[str, str]]:
    """``?tags=a+b,c``: ``X-Cache-Tags: a b`` and ``Cache-Tag: c`` (the part after the first comma)."""
    tags = RETAGGED.get(uri)
    if tags is None:
        tags = parse_qs(urlsplit(uri).query).get("tags", [""])[0]
    first, _, rest = tags.partition(",")
    headers = [("X-Cache-Tags", first)] if first else []
    return headers + ([("Cache-Tag", rest)] if rest else [])


def page(name: str, *tags: str) -> str:
    """A URI whose page carries *tags* (the first in X-Cache-Tags, the others in Cache-Tag)."""
    if not tags:
        return f"/{name}"
    return f"/{name}?tags={'+'.join(tags[:1])}" + (f",{'+'.join(tags[1:])}" if tags[1:] else "")


def sites(prefix: str = "t") -> list[Site]:
    return [Site(f"{prefix}-{t}.example", stale=True, use_temp_path=on) for t, on in TEMP.items()]


def await_ready(stack: Stack, zones: list[Path]) -> None:
    """Wait for each zone's ``tag index ready`` line in the daemon's log."""
    stack.wait(lambda: all(f"tag index ready for {z}:" in stack.log for z in zones), 60, "tag indexes ready")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with TagStack(sites(), fcgi=FastCGIServer(headers=origin_tags), daemon=False) as stack:
        yield stack


@pytest.fixture
def tagged(stack: Stack) -> Stack:
    """The module's stack with a daemon that indexes tags, its indexes ready."""
    running = stack.daemon is not None and stack.daemon_yaml == TAGS_YAML
    stack.use_daemon(TAGS_YAML)
    if not running:
        await_ready(stack, [stack.zone(h) for h in stack.sites])
    return stack


@pytest.fixture(params=list(TEMP), ids=[f"use_temp_path={t}" for t in TEMP])
def host(request: pytest.FixtureRequest) -> str:
    return f"t-{request.param}.example"


def cached(stack: Stack, host: str, uris: list[str]) -> dict[str, str]:
    return {uri: stack.until_hit(host, uri) for uri in uris}


def statuses(stack: Stack, host: str, uris: list[str]) -> dict[str, str]:
    return {uri: stack.status(host, uri) for uri in uris}


def purge_lines(stack: Stack, line: str) -> list[str]:
    return [x for x in stack.log.splitlines() if f"purge {line!r} " in x]


def one_purge_line(stack: Stack, line: str) -> str:
    found = stack.wait(lambda: purge_lines(stack, line), 10, f"the log line of {line!r}")
    time.sleep(0.1)
    assert purge_lines(stack, line) == found and len(found) == 1, found
    return str(found[0])


# --- exactly the pages that carry a tag -------------------------------------------------------------


def test_a_tag_purge_makes_exactly_the_pages_carrying_the_tag_miss(tagged: Stack, host: str) -> None:
    zone = tagged.zone(host)
    pages = {
        "a": page("exact/a", "x-post-1", "x-home"),
        "b": page("exact/b", "x-home", "x-term-7", "x-post-1"),  # in Cache-Tag
        "c": page("exact/c", "x-post-2", "x-home"),
        "d": page("exact/d", "x-term-7"),
        "e": page("exact/e"),
        "f": page("exact/f", "x-post-10"),
        "g": page("exact/g", "X-Post-1"),
    }
    uris = list(pages.values())
    cached(tagged, host, uris)
    reply = tagged.purge(f"tag:{zone} x-post-1")
    assert reply == b"Purge: Success\n"
    assert statuses(tagged, host, uris) == {
        uri: "MISS" if name in "ab" else "HIT" for name, uri in pages.items()
    }
    logged = one_purge_line(tagged, f"tag:{zone} x-post-1")
    assert re.search(
        rf"purge 'tag:{re.escape(str(zone))} x-post-1' deleted, 2 deleted of 2 candidates, answered by the index, "
        r"\d+\.\d ms$",
        logged,
    ), logged
    cached(tagged, host, uris)
    assert tagged.purge(f"tag:{zone} x-post-2,x-term-7") == OK  # any of the tags
    assert statuses(tagged, host, uris) == {
        uri: "MISS" if name in "bcd" else "HIT" for name, uri in pages.items()
    }
    assert "3 deleted of 3 candidates, answered by the index" in one_purge_line(tagged, f"tag:{zone} x-post-2,x-term-7")


def test_other_zones_are_not_touched(tagged: Stack, host: str) -> None:
    other = next(h for h in tagged.sites if h != host)
    uri = page("zones/p", "z-post-1")
    cached(tagged, host, [uri])
    cached(tagged, other, [uri])
    assert tagged.purge(f"tag:{tagged.zone(host)} z-post-1") == OK
    assert (tagged.status(host, uri), tagged.status(other, uri)) == ("MISS", "HIT")


def test_a_soft_tag_purge_makes_them_stale_then_fresh(tagged: Stack, host: str) -> None:
    zone = tagged.zone(host)
    old = cached(tagged, host, [page("soft/a", "s-post-1", "s-home"), page("soft/b", "s-term", "s-post-1")])
    kept = cached(tagged, host, [page("soft/c", "s-home"), page("soft/d")])
    assert tagged.purge(f"soft:tag:{zone} s-post-1") == b"Purge: Success\n"
    assert "2 marked expired of 2 candidates, answered by the index" in one_purge_line(
        tagged, f"soft:tag:{zone} s-post-1"
    )
    for uri, body in kept.items():
        assert tagged.get(host, uri) == ("HIT", body)
    assert_stale_then_hit(tagged, host, old)
    for uri, body in kept.items():
        assert tagged.get(host, uri) == ("HIT", body)


def test_hard_tag_purge_of_a_soft_default(tagged: Stack, host: str) -> None:
    """``hard:tag:...`` deletes; the fresh copies nginx then caches carry the tags again and are indexed."""
    zone = tagged.zone(host)
    uri = page("hard/a", "h-post-1")
    cached(tagged, host, [uri])
    assert tagged.purge(f"hard:tag:{zone} h-post-1") == OK
    assert not tagged.file(host, uri).exists() and tagged.status(host, uri) == "MISS"
    cached(tagged, host, [uri])
    assert tagged.purge(f"tag:{zone} h-post-1") == OK
    assert tagged.status(host, uri) == "MISS"


def test_an_entry_nginx_replaced_with_other_tags(tagged: Stack, host: str) -> None:
    zone = tagged.zone(host)
    uri = page("replaced/a", "r-old")
    body = cached(tagged, host, [uri])[uri]
    RETAGGED[uri] = "r-new"
    try:
        # nginx refreshes the page in the background and renames its new copy over the old file.
        assert tagged.purge(f"soft:http://{host}{uri}") == OK
        assert tagged.get(host, uri) == ("STALE", body)
        tagged.wait_fresh(host, uri)
        fresh = tagged.until_hit(host, uri)
        assert page_number(fresh) > page_number(body)
        assert b"X-Cache-Tags: r-new\r\n" in tagged.file(host, uri).read_bytes()
        assert tagged.purge(f"tag:{zone} r-old") == OK
        assert tagged.get(host, uri) == ("HIT", fresh)
        assert tagged.purge(f"tag:{zone} r-new") == OK
        assert tagged.status(host, uri) == "MISS"
    finally:
        del RETAGGED[uri]


def test_the_tags_header_is_hidden_from_visitors_and_stored(tagged: Stack, host: str) -> None:
    uri = page("hidden/a", "v-post-1", "v-term")
    cached(tagged, host, [uri])
    conn = http.client.HTTPConnection("127.0.0.1", tagged.web_port, timeout=10)
    try:
        conn.request("GET", uri, headers={"Host": host})
        reply = conn.getresponse()
        reply.read()
        assert reply.getheader("X-Cache-Status") == "HIT" and reply.getheader("X-Cache-Tags") is None
    finally:
        conn.close()
    assert b"X-Cache-Tags: v-post-1\r\n" in tagged.file(host, uri).read_bytes()


def test_a_symlink_planted_in_the_zone_is_never_followed(tagged: Stack, host: str) -> None:
    zone = tagged.zone(host)
    outside = tagged.base / f"outside-{host}"
    target = outside / "cd" / ("e" * 32)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(entry_bytes("httpGETelsewhere/x", headers=[("X-Cache-Tags", "l-post-1")]))
    mtime = (int(time.time()) - 3600) * 10**9
    os.utime(target, ns=(mtime, mtime))
    original = target.read_bytes()
    uri = page("link/a", "l-post-1")
    cached(tagged, host, [uri])
    level = tagged.file(host, uri).parent
    links = [zone / "link-dir", level / ("f" * 32)]
    links[0].symlink_to(outside, target_is_directory=True)
    links[1].symlink_to(target)
    try:
        for line in (f"soft:tag:{zone} l-post-1", f"tag:{zone} l-post-1"):
            assert tagged.purge(line) == OK
        assert tagged.status(host, uri) == "MISS"
        assert target.read_bytes() == original and target.stat().st_mtime_ns == mtime
        assert valid_sec(target) > time.time()
        assert all(p.is_symlink() for p in links)
    finally:
        for p in links:
            p.unlink()


def test_after_a_site_purge_the_pages_cached_again_are_indexed(tagged: Stack, host: str) -> None:
    """The SpinupWP plugin's own line empties the zone (its level directories go to the trash); nginx makes
    new ones as it caches again, and the index follows."""
    zone = tagged.zone(host)
    uris = [page(f"site/{i}", "sp-post-1" if i % 2 else "sp-post-2") for i in range(6)]
    cached(tagged, host, uris)
    assert tagged.purge(f"{zone}") == OK
    assert statuses(tagged, host, uris) == {u: "MISS" for u in uris}
    cached(tagged, host, uris)
    assert tagged.purge(f"tag:{zone} sp-post-1") == OK
    assert "3 deleted of 3 candidates, answered by the index" in one_purge_line(tagged, f"tag:{zone} sp-post-1")
    assert statuses(tagged, host, uris) == {u: "MISS" if i % 2 else "HIT" for i, u in enumerate(uris)}


def test_pages_cached_before_the_daemon_started(stack: Stack, host: str) -> None:
    """Entries nginx wrote while the daemon was down are found by its cold scan."""
    zone = stack.zone(host)
    stack.stop_daemon()
    uris = [page(f"before/{i}", "b-post-1" if i % 2 else "b-post-2", "b-all") for i in range(6)]
    cached(stack, host, uris)
    stack.start_daemon(TAGS_YAML)
    await_ready(stack, [stack.zone(h) for h in stack.sites])
    assert stack.purge(f"tag:{zone} b-post-2") == OK
    assert "3 deleted of 3 candidates, answered by the index" in one_purge_line(stack, f"tag:{zone} b-post-2")
    assert statuses(stack, host, uris) == {u: "HIT" if i % 2 else "MISS" for i, u in enumerate(uris)}


# --- the wire ---------------------------------------------------------------------------------------------


def test_replies(tagged: Stack, host: str) -> None:
    zone = tagged.zone(host)
    for line in (
        f"tag:{zone}",  # no tags
        f"tag:{zone} ",
        f"tag:{zone} ,, ,",
        "tag: x-post-1",
        "tag:x-post-1",
        f"tag:{tagged.base}/elsewhere x-post-1",  # outside the roots
        f"tag:{tagged.root} x-post-1",  # the root itself
        f"tag:{zone}/../{host} x-post-1",
        f"tag:{zone} {'t' * 1025}",
        f"tag:{zone} " + ",".join(f"t{i}" for i in range(1001)),
        f"soft:hard:tag:{zone} x-post-1",
        f"tags:{zone} x-post-1",
    ):
        assert tagged.purge(line) == b"Purge: Error\n", line
    for line in (
        f"tag:{zone} nothing-carries-this",
        f"tag:{zone}/0/zz nothing-carries-this",  # nothing cached there
        f"tag:{tagged.root}/no-such-zone nothing",
        f"tag:{zone} {'t' * 1024}",
        f"hard:tag:{zone} a,b c\td",
    ):
        assert tagged.purge(line) == b"Purge: Success\n", line
    uri = page("replies/a", "w-post-1")
    cached(tagged, host, [uri])
    assert tagged.purge(f"tag:{zone}/{tagged.file(host, uri).parent.relative_to(zone)} w-post-1") == OK
    assert tagged.status(host, uri) == "MISS"


def test_tag_purges_are_refused_when_tags_are_off(stack: Stack, host: str) -> None:
    stack.use_daemon("")
    zone = stack.zone(host)
    cached(stack, host, [page("off/a", "o-post-1")])
    assert stack.purge(f"tag:{zone} o-post-1") == ERROR
    assert stack.status(host, page("off/a", "o-post-1")) == "HIT"
    assert "tag purges need purge.tags.enabled: true" in one_purge_line(stack, f"tag:{zone} o-post-1")


# --- the cold scan ----------------------------------------------------------------------------------------


PLANTED = 60_000


def plant_zone(stack: Stack, host: str, count: int) -> None:
    """*count* tagged v5 entries in the zone, owned as nginx's worker owns its files."""
    zone = stack.zone(host)
    for i in range(count):
        key = f"httpGET{host}/planted/{i}"
        path = Path(f"{zone}/{i % 16:x}/{(i // 16) % 256:02x}/{i:032x}")
        if i < 16 * 256:
            stack.dirs(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, entry_bytes(key, headers=[("X-Cache-Tags", f"planted planted-{i % 100}")]))
        os.close(fd)
        if stack.worker:
            os.chown(path, *stack.worker)


def test_entries_cached_during_the_cold_scan() -> None:
    """The daemon starts on a zone of 60,000 entries: pages cached while its index is being built are
    purged by a scan while it is, and by the index once it is ready."""
    with TagStack([Site("cold.example", stale=True, use_temp_path=False)], fcgi=FastCGIServer(headers=origin_tags),
                  daemon=False) as cold:
        host = "cold.example"
        zone = cold.zone(host)
        plant_zone(cold, host, PLANTED)
        cold.start_daemon(TAGS_YAML)
        first = [page(f"cold/a{i}", "c-first", "c-all") for i in range(5)]
        second = [page(f"cold/b{i}", "c-second", "c-all") for i in range(5)]
        other = [page("cold/o", "c-other")]
        cached(cold, host, first + second + other)
        assert cold.purge(f"tag:{zone} c-first") == OK
        logged = one_purge_line(cold, f"tag:{zone} c-first")
        assert "answered by the index" not in logged, f"the cold scan ended before the purge; plant more: {logged}"
        assert "5 deleted of " in logged and "answered by a scan (the index is not ready)" in logged, logged
        everything = first + second + other
        assert statuses(cold, host, everything) == {u: "MISS" if u in first else "HIT" for u in everything}
        await_ready(cold, [zone])
        ready = next(x for x in cold.log.splitlines() if f"tag index ready for {zone}:" in x)
        assert re.search(r"\d+ entries, \d+ tags \(\d+ entry-tag pairs\) in [\d.]+ s$", ready), ready
        assert cold.purge(f"tag:{zone} c-second") == OK
        assert "5 deleted of 5 candidates, answered by the index" in one_purge_line(cold, f"tag:{zone} c-second")
        assert statuses(cold, host, everything) == {u: "MISS" if u in second else "HIT" for u in everything}
        assert cold.purge(f"tag:{zone} planted-7") == OK
        assert "600 deleted of 600 candidates" in one_purge_line(cold, f"tag:{zone} planted-7")
        assert cold.purge(f"tag:{zone} c-all") == OK
        assert "10 deleted of 10 candidates" in one_purge_line(cold, f"tag:{zone} c-all")
