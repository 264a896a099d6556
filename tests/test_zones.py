"""URL → nginx cache file paths and key prefixes, as nginx computes them."""

from __future__ import annotations

import hashlib

import pytest

from cachesvc.purge.config import ZoneConfig, check_zone
from cachesvc.purge.paths import PathPolicy, Refused
from cachesvc.purge.zones import ZoneMap, cache_file, parse_url, render_key

POLICY = PathPolicy(["/cache"])


def zonemap(**kw) -> ZoneMap:
    kw.setdefault("hosts", ["example.com", "www.example.com"])
    kw.setdefault("path", "/cache/{host}")
    return ZoneMap([check_zone(ZoneConfig(**kw), ["/cache"])], POLICY)


def test_spinupwp_example_path_is_the_trailing_slash_twin() -> None:
    paths = [t.path for t in zonemap(methods=["GET"]).files("https://example.com/hello-world")]
    assert "/cache/example.com/5/cd/ee80e68666834decf6fe00921710ccd5" in paths
    assert len(paths) == 2  # as given, and the twin


def test_levels_are_cut_from_the_end_of_the_hash() -> None:
    key = "httpsGETexample.com/"
    digest = hashlib.md5(key.encode()).hexdigest()
    assert cache_file("/z", (1, 2), key) == f"/z/{digest[-1]}/{digest[-3:-1]}/{digest}"
    assert cache_file("/z", (2,), key) == f"/z/{digest[-2:]}/{digest}"
    assert cache_file("/z", (1, 1, 2), key) == f"/z/{digest[-1]}/{digest[-2]}/{digest[-4:-2]}/{digest}"
    assert cache_file("/z", (), key) == f"/z/{digest}"


def test_every_method_and_twin_is_a_candidate() -> None:
    files = zonemap().files("https://www.example.com/p?x=1")
    keys = ["httpsGETwww.example.com/p?x=1", "httpsHEADwww.example.com/p?x=1",
            "httpsGETwww.example.com/p/?x=1", "httpsHEADwww.example.com/p/?x=1"]
    assert sorted(t.path for t in files) == sorted(cache_file("/cache/www.example.com", (1, 2), k) for k in keys)


@pytest.mark.parametrize(
    "url, scheme, host, http_host, request_uri",
    [
        ("https://Example.COM/a/b", "https", "example.com", "Example.COM", "/a/b"),
        ("HTTP://example.com:8080/x?y=1#frag", "http", "example.com", "example.com:8080", "/x?y=1"),
        ("https://example.com", "https", "example.com", "example.com", "/"),
        ("https://example.com?q", "https", "example.com", "example.com", "/?q"),
        ("https://user@example.com./p", "https", "example.com", "example.com.", "/p"),
        ("https://example.com/caf\u00e9 x", "https", "example.com", "example.com", "/caf%C3%A9%20x"),
        ("https://[::1]:8443/p", "https", "[::1]", "[::1]:8443", "/p"),
    ],
)
def test_url_parts_match_nginx_variables(url: str, scheme: str, host: str, http_host: str, request_uri: str) -> None:
    r = parse_url(url)
    assert (r.scheme, r.host, r.http_host, r.request_uri) == (scheme, host, http_host, request_uri)


def test_variables() -> None:
    v = parse_url("https://example.com//a%20b?x=1").variables("GET")
    assert render_key("$scheme|${request_method}|$host|$uri|$args|$is_args", v) == "https|GET|example.com|/a b|x=1|?"
    assert render_key("$uri$is_args$args", parse_url("https://example.com/p").variables("GET")) == "/p"


def test_wildcard_zone_and_unmatched_host() -> None:
    zm = zonemap(hosts=["*"])
    assert zm.files("https://any.example/")[0].path.startswith("/cache/any.example/")
    with pytest.raises(Refused, match="no purge.zones entry serves host 'other.example'"):
        zonemap().files("https://other.example/")


@pytest.mark.parametrize("url", ["https://../x", "https://./", "https://:80/x", "ftp://example.com/", "https:///x"])
def test_hostile_urls_never_leave_the_root(url: str) -> None:
    with pytest.raises(Refused):
        zonemap(hosts=["*"]).files(url)


def test_prefixes() -> None:
    [(zone, prefixes)] = zonemap().prefixes("https://example.com/blog/")
    assert zone.path == "/cache/example.com"
    assert prefixes == [b"httpsGETexample.com/blog/", b"httpsHEADexample.com/blog/"]
    with pytest.raises(Refused, match="ends with"):
        zonemap(key="$request_uri$host").prefixes("https://example.com/blog/")


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"levels": "3:2"}, "levels"),
        ({"levels": "1:2:2:1"}, "levels"),
        ({"key": "$scheme$cookie_x"}, "$cookie_x is not supported"),
        ({"key": "$scheme$"}, "'$'"),
        ({"hosts": []}, "hosts"),
        ({"methods": []}, "methods"),
        ({"path": "/elsewhere/{host}"}, "not below a cache root"),
        ({"path": "/cache"}, "not below a cache root"),
    ],
)
def test_zone_checks(kw: dict, message: str) -> None:
    kw.setdefault("hosts", ["example.com"])
    kw.setdefault("path", "/cache/{host}")
    with pytest.raises(ValueError, match=message.replace("$", r"\$").replace("(", r"\(")):
        check_zone(ZoneConfig(**kw), ["/cache"])
