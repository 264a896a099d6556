"""Cache warming against a real nginx FastCGI cache (issue 10): after a purge the daemon re-requests
what it purged, through nginx, so that the next visitor finds a HIT.

Nothing here sends a visitor request between a purge and the check that the pages are back: the
cache files are watched on disk (a page is back when its file is fresh and holds a newer answer of
the origin, ``#N`` in the body), and the FastCGI origin records what reached it
(``User-Agent: cachesvc-warm/...``, no Cookie) and how many requests at once.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Iterator

import pytest

from harness.fastcgi import Request, overlap
from harness.nginx import OK, Site, Stack, cache_files, page_number, page_on_disk

TEMP = {"on": True, "off": False}
AGENT = "cachesvc-warm/"


def warm_yaml(enabled: bool = True, concurrency: int = 2, slow_response: str = "5s", timeout: str = "10s") -> str:
    return f"""
        warm:
          enabled: {"true" if enabled else "false"}
          origins: {{http: "{{origin}}"}}
          concurrency: {concurrency}
          slow_response: {slow_response}
          timeout: {timeout}
    """


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """Plain zones (w-) and zones with use_stale updating + background_update (ws-); the daemon is
    (re)started by each test with its warm config."""
    sites = [Site(f"w-{t}.example", use_temp_path=on) for t, on in TEMP.items()]
    sites += [Site(f"ws-{t}.example", stale=True, use_temp_path=on) for t, on in TEMP.items()]
    with Stack(sites, daemon=False) as stack:
        yield stack


@pytest.fixture(params=list(TEMP), ids=[f"use_temp_path={t}" for t in TEMP])
def temp(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def fast_origin(stack: Stack) -> Iterator[None]:
    stack.fcgi.delay = 0.0
    yield
    stack.fcgi.delay = 0.0


def empty(stack: Stack, host: str) -> None:
    """Remove what earlier tests cached in the zone (from disk: no purge, so nothing is warmed)."""
    for child in stack.zone(host).iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def cached(stack: Stack, host: str, paths: list[str], clear: bool = True) -> dict[str, str]:
    """Make every path a HIT (in a zone emptied first, unless *clear* is false); {path: body}."""
    if clear:
        empty(stack, host)
    return {path: stack.until_hit(host, path) for path in paths}


def rewarmed(stack: Stack, host: str, before: dict[str, str], timeout: float = 30.0) -> None:
    """Wait until nginx has cached every page anew (a fresh file with a newer page), without a visitor."""

    def back(path: str) -> bool:
        number = page_on_disk(stack.file(host, path))
        return number is not None and number > page_number(before[path])

    stack.wait(lambda: all(back(p) for p in before), timeout, f"{len(before)} pages of {host} warmed back")


def settled(stack: Stack, since: int) -> list[Request]:
    """The origin's requests since *since*, once every one of them has been answered."""
    stack.wait(lambda: all(r.ended is not None for r in stack.fcgi.seen(since)), 30, "the origin's requests answered")
    return stack.fcgi.seen(since)


def assert_warm_requests(stack: Stack, host: str, requests: list[Request], paths: Iterable[str]) -> None:
    assert requests, f"the origin saw no request{stack.logs()}"
    for r in requests:
        assert r.user_agent.startswith(AGENT), f"not a warm request: {r.params}{stack.logs()}"
        assert r.cookie is None, f"a warm request carries a Cookie: {r.params}"
        assert (r.method, r.host) == ("GET", host), r.params
    assert sorted({r.uri for r in requests}) == sorted(paths)


def assert_hits_with_new_bodies(stack: Stack, host: str, before: dict[str, str]) -> None:
    for path, body in before.items():
        status, new = stack.get(host, path)
        assert status == "HIT", f"{host}{path}: {status} after the warm-up{stack.logs()}"
        assert page_number(new) > page_number(body), f"{host}{path}: still the page from before the purge"


def test_hard_site_purge_warms_pages_back_without_a_visitor(stack: Stack, temp: str) -> None:
    host = f"w-{temp}.example"
    stack.use_daemon(warm_yaml(concurrency=2))
    before = cached(stack, host, [f"/page/{i}" for i in range(8)] + ["/q?x=1"])
    stack.fcgi.delay = 0.1  # long enough for warm requests to overlap
    mark = stack.fcgi.mark()
    stack.fcgi.reset_peak()
    assert stack.purge(f"{stack.zone(host)}") == OK
    rewarmed(stack, host, before)
    requests = settled(stack, mark)
    assert_warm_requests(stack, host, requests, before)
    assert len(requests) == len(before), f"a URL warmed twice: {sorted(r.uri for r in requests)}"
    assert stack.fcgi.peak <= 2, f"the origin saw {stack.fcgi.peak} requests at once (concurrency: 2)"
    assert overlap(requests) <= 2
    assert_hits_with_new_bodies(stack, host, before)


def test_a_slowing_origin_makes_the_warm_up_back_off(stack: Stack, temp: str) -> None:
    """concurrency 4, slow_response 0.2 s, the origin takes 0.5 s: the first wave's slow answers halve
    the concurrency (at most 2 at once), the next ones halve it again (1 at once)."""
    host = f"w-{temp}.example"
    stack.use_daemon(warm_yaml(concurrency=4, slow_response="0.2s"))
    before = cached(stack, host, [f"/slow/{i}" for i in range(12)])
    stack.fcgi.delay = 0.5
    mark = stack.fcgi.mark()
    stack.fcgi.reset_peak()
    assert stack.purge(f"{stack.zone(host)}") == OK
    rewarmed(stack, host, before, timeout=60)
    requests = settled(stack, mark)
    assert_warm_requests(stack, host, requests, before)
    assert stack.fcgi.peak <= 4
    ends = sorted(r.ended for r in requests if r.ended is not None)
    starts = sorted(r.started for r in requests)
    shape = [(round(r.started - starts[0], 2), round((r.ended or 0) - starts[0], 2)) for r in requests]
    assert overlap(requests, after=ends[3]) <= 2, f"no back-off after the first 4 slow answers: {shape}"
    assert overlap(requests, after=ends[7]) <= 1, f"no further back-off after 8 slow answers: {shape}"
    assert any(r.started >= ends[7] for r in requests), f"the warm-up did not last past 8 answers: {shape}"


def test_warming_off_requests_nothing(stack: Stack, temp: str) -> None:
    host = f"w-{temp}.example"
    stack.use_daemon(warm_yaml(enabled=False))
    cached(stack, host, ["/cold/1", "/cold/2"])
    mark = stack.fcgi.mark()
    assert stack.purge(f"{stack.zone(host)}") == OK
    assert stack.purge(f"http://{host}/cold/1") == OK
    time.sleep(2)
    assert stack.fcgi.seen(mark) == [], f"the origin was asked: {[r.params for r in stack.fcgi.seen(mark)]}"
    assert cache_files(stack.zone(host)) == []


def test_url_purge_warms_that_url(stack: Stack, temp: str) -> None:
    host = f"w-{temp}.example"
    stack.use_daemon(warm_yaml())
    before = cached(stack, host, ["/url/1"])
    kept = cached(stack, host, ["/url/2"], clear=False)
    mark = stack.fcgi.mark()
    assert stack.purge(f"http://{host}/url/1") == OK
    rewarmed(stack, host, before)
    assert_warm_requests(stack, host, settled(stack, mark), ["/url/1"])
    assert_hits_with_new_bodies(stack, host, before)
    assert page_on_disk(stack.file(host, "/url/2")) == page_number(kept["/url/2"])
    assert stack.get(host, "/url/2") == ("HIT", kept["/url/2"])


def test_prefix_purge_warms_what_it_removed(stack: Stack, temp: str) -> None:
    host = f"w-{temp}.example"
    stack.use_daemon(warm_yaml())
    before = cached(stack, host, ["/news/1", "/news/2?p=2"])
    kept = cached(stack, host, ["/other"], clear=False)
    mark = stack.fcgi.mark()
    assert stack.purge(f"http://{host}/news/*") == OK
    rewarmed(stack, host, before)
    assert_warm_requests(stack, host, settled(stack, mark), before)
    assert page_on_disk(stack.file(host, "/other")) == page_number(kept["/other"])


@pytest.mark.parametrize("kind", ["ws", "w"], ids=["use_stale", "plain"])
def test_soft_purge_with_warming_refreshes(stack: Stack, temp: str, kind: str) -> None:
    """A soft site purge marks the entries; the warm requests make nginx refresh them (STALE with a
    background update, or EXPIRED), so the next visitor gets a HIT with the new page."""
    host = f"{kind}-{temp}.example"
    stack.use_daemon(warm_yaml())
    paths = [f"/soft/{i}" for i in range(4)]
    before = cached(stack, host, paths)
    mark = stack.fcgi.mark()
    assert stack.purge(f"soft:{stack.zone(host)}") == OK
    stack.wait_all_fresh(host, paths)
    assert_warm_requests(stack, host, settled(stack, mark), paths)
    assert_hits_with_new_bodies(stack, host, before)


def test_files_outside_the_purge_are_not_warmed(stack: Stack, temp: str) -> None:
    """Only what the purge removed: entries of another zone are neither requested nor replaced."""
    host, other = f"w-{temp}.example", f"ws-{temp}.example"
    stack.use_daemon(warm_yaml())
    before = cached(stack, host, ["/mine"])
    theirs = cached(stack, other, ["/theirs"])
    mark = stack.fcgi.mark()
    assert stack.purge(f"{stack.zone(host)}") == OK
    rewarmed(stack, host, before)
    requests = settled(stack, mark)
    assert [r.host for r in requests if r.host != host] == []
    assert page_on_disk(stack.file(other, "/theirs")) == page_number(theirs["/theirs"])
