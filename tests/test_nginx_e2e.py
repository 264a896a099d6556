"""Purges against a real nginx FastCGI cache: after a purge the next request is a MISS, then a HIT again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.nginx import OK, Site, Stack


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    sites = [Site("on.example", use_temp_path=True), Site("off.example", use_temp_path=False)]
    with Stack(sites) as stack:
        yield stack


@pytest.fixture(params=["on", "off"], ids=["use_temp_path=on", "use_temp_path=off"])
def host(request: pytest.FixtureRequest) -> str:
    return f"{request.param}.example"


def test_cache_files_are_where_the_daemon_computes_them(stack: Stack, host: str) -> None:
    stack.until_hit(host, "/where")
    assert stack.file(host, "/where").is_file()


def test_url_purge_then_miss_then_hit(stack: Stack, host: str) -> None:
    stack.until_hit(host, "/post")
    assert stack.purge(f"http://{host}/post") == OK
    assert not stack.file(host, "/post").exists()
    assert stack.status(host, "/post") == "MISS"
    stack.until_hit(host, "/post")


def test_url_purge_covers_the_trailing_slash_twin(stack: Stack, host: str) -> None:
    stack.until_hit(host, "/twin/")
    assert stack.purge(f"http://{host}/twin") == OK
    assert stack.status(host, "/twin/") == "MISS"


def test_site_purge_then_miss_then_hit(stack: Stack, host: str) -> None:
    zone = stack.zone(host)
    for path in ("/a", "/b", "/c?x=1"):
        stack.until_hit(host, path)
    mode, owner = zone.stat().st_mode, zone.stat().st_uid
    assert stack.purge(f"{zone}") == OK
    assert zone.is_dir() and (zone.stat().st_mode, zone.stat().st_uid) == (mode, owner)
    assert not any(f.is_file() for f in zone.rglob("*") if len(f.name) == 32)
    for path in ("/a", "/b", "/c?x=1"):
        assert stack.status(host, path) == "MISS"
        stack.until_hit(host, path)  # nginx keeps caching in the kept zone directory


def test_prefix_purge_then_miss_and_others_stay_hits(stack: Stack, host: str) -> None:
    for path in ("/blog/1", "/blog/2?page=2", "/shop/1"):
        stack.until_hit(host, path)
    assert stack.purge(f"http://{host}/blog/*") == OK
    assert stack.status(host, "/blog/1") == "MISS"
    assert stack.status(host, "/blog/2?page=2") == "MISS"
    assert stack.status(host, "/shop/1") == "HIT"
    stack.until_hit(host, "/blog/1")
