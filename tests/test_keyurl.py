"""Turning nginx cache keys back into URLs (cachesvc.purge.keyurl), checked against the purge side's key rendering."""

from __future__ import annotations

import pytest

from cachesvc.purge.keyurl import url_maker, why_not_invertible
from cachesvc.purge.zones import parse_url, render_key

SPINUPWP = "$scheme$request_method$host$request_uri"
TEMPLATES = [
    SPINUPWP,
    "${scheme}${request_method}${host}${request_uri}",
    "$scheme://$host$request_uri",
    "$request_method $scheme://$host$request_uri",
    "cache:$scheme|$request_method|$host$request_uri",
    "$scheme $host $request_uri $host",  # a repeated variable
]
URLS = [
    "https://example.com/",
    "http://example.com/blog/?p=1",
    "https://example.com/blog/hello-world/",
    "https://Example.COM/Mixed/Case/",  # $host is lower-cased, the path is not
    "https://example.com:8443/shop/?add-to-cart=12&quantity=2",  # $host has no port
    "http://example.com./trailing-dot",
    "https://example.com/caf\u00e9/?q=\u00e9t\u00e9",  # sent percent-encoded
    "https://example.com/a%2Fb/%7euser/?x=%20&y=a+b",  # percent-encoding kept as sent
    "https://example.com/p?a=b?c&&d=",
    "https://example.com//double//slashes/",
    "https://example.com/x;y=1/z?q=|^",
    "https://user:pw@example.com/private/",
    "https://example.com/search?s=hello%20world#results",  # no fragment reaches nginx
    "https://sub.domain.example.co.uk/wp-json/wp/v2/posts?per_page=100",
    "http://192.0.2.7/by-ip/",
    "https://xn--bcher-kva.example/unicode-host/",
    "https://example.com/?",  # an empty query is still a "?"
]


def expected(url: str) -> str:
    request = parse_url(url)
    return f"{request.scheme}://{request.host}{request.request_uri}"


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("url", URLS)
def test_get_keys_round_trip_to_the_url_nginx_saw(template: str, url: str) -> None:
    make = url_maker(template)
    assert make is not None, why_not_invertible(template)
    key = render_key(template, parse_url(url).variables("GET"))
    assert make(key) == expected(url)


def test_the_spinupwp_key_example() -> None:
    make = url_maker(SPINUPWP)
    assert make is not None and why_not_invertible(SPINUPWP) is None
    assert make("httpsGETexample.com/blog/?p=1") == "https://example.com/blog/?p=1"
    assert make("httpGETexample.com/") == "http://example.com/"
    assert make("httpsGETshop.example.com/GET/POST?x=GET") == "https://shop.example.com/GET/POST?x=GET"


@pytest.mark.parametrize("method", ["HEAD", "POST", "PURGE", "OPTIONS"])
@pytest.mark.parametrize("template", [t for t in TEMPLATES if "request_method" in t])
def test_only_get_entries_are_warmed(template: str, method: str) -> None:
    make = url_maker(template)
    assert make is not None
    assert make(render_key(template, parse_url("https://example.com/page/").variables(method))) is None


@pytest.mark.parametrize(
    "key",
    [
        "httpsHEADexample.com/",
        "ftpGETexample.com/",  # not a scheme nginx has
        "httpsGETExample.com/",  # $host is never upper-case
        "httpsgetexample.com/",  # a method is upper-case
        "httpsGET/no-host",
        "httpsGETexample.com",  # no $request_uri
        "httpsGETexample.com/with space",
        "httpsGETexample.com/tab\there",
        "httpsGETexample.com/nul\x00",
        "httpsGETexample.com/del\x7f",
        "httpsGETexa mple.com/",
        "httpsGETexample.com?/",
        "",
        "somethingelse",
    ],
)
def test_keys_that_do_not_fit_the_template_give_no_url(key: str) -> None:
    make = url_maker(SPINUPWP)
    assert make is not None
    assert make(key) is None


def test_literal_text_is_matched_exactly_and_regex_characters_are_literal() -> None:
    template = "v1.(x)*$scheme$request_method$host$request_uri"
    make = url_maker(template)
    assert make is not None
    assert make("v1.(x)*httpsGETexample.com/") == "https://example.com/"
    assert make("v1X(x)*httpsGETexample.com/") is None  # "." is not a wildcard
    assert make("v2.(x)*httpsGETexample.com/") is None


def test_a_repeated_variable_must_agree() -> None:
    make = url_maker("$scheme $host $request_uri $host")
    assert make is not None
    assert make("https example.com /a example.com") == "https://example.com/a"
    assert make("https example.com /a other.example") is None


def test_without_scheme_the_url_is_http_and_without_method_every_key_is_get() -> None:
    make = url_maker("$host$request_uri")
    assert make is not None
    assert make("example.com/a?b") == "http://example.com/a?b"
    method_only = url_maker("$request_method$host$request_uri")
    assert method_only is not None
    assert method_only("GETexample.com/") == "http://example.com/"
    assert method_only("HEADexample.com/") is None


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("$scheme$request_method$host$uri", "key uses $uri;"),
        ("$scheme$request_method$host$uri$is_args$args", "key uses $uri;"),
        ("$scheme$request_method$http_host$request_uri", "key uses $http_host;"),
        ("$scheme$host$request_uri$cookie_wordpress_logged_in", "key uses $cookie_wordpress_logged_in;"),
        ("${scheme}${request_method}${host}${request_uri}${args}", "key uses $args;"),
        ("$scheme$request_method$request_uri", "key has no $host;"),
        ("$scheme$request_method$host", "key has no $request_uri;"),
        ("static-key", "key has no $host;"),
        ("$scheme$host$request_uri", "ambiguous: $scheme followed by $host"),  # "https" + "ex" or "http" + "sex"
        ("$scheme$request_method$request_uri$host", "ambiguous: $request_uri followed by $host"),
        ("$request_method$request_method$host$request_uri", "ambiguous: $request_method followed by $request_method"),
        ("$scheme$request_method$host.$request_uri", "ambiguous: $host followed by '.'"),
        ("$scheme$request_method$host$request_uri|", "ambiguous: $request_uri followed by '|'"),
        ("${scheme}s$request_method$host$request_uri", "ambiguous: $scheme followed by 's'"),
        ("$schemes$request_method$host$request_uri", "key uses $schemes;"),  # nginx reads the longest name
    ],
)
def test_templates_that_cannot_be_inverted_are_refused_with_a_reason(template: str, says: str) -> None:
    assert url_maker(template) is None
    reason = why_not_invertible(template)
    assert reason is not None and says in reason
    assert "$scheme, $request_method, $host, $request_uri" in reason


@pytest.mark.parametrize(
    "template",
    [
        "$host$request_uri",
        "$scheme$request_method$host$request_uri",
        "$request_uri $host",  # whitespace ends $request_uri
        "$host$request_method$request_uri",  # upper case ends $host
        "$request_method$scheme://$host$request_uri",
        "$scheme:$host$request_uri",
        "$scheme-$host$request_uri",
    ],
)
def test_unambiguous_templates_are_accepted(template: str) -> None:
    assert why_not_invertible(template) is None
    assert url_maker(template) is not None


def test_separators_that_variables_cannot_hold_still_round_trip() -> None:
    template = "$scheme $request_uri $host"
    make = url_maker(template)
    assert make is not None
    for url in URLS:
        assert make(render_key(template, parse_url(url).variables("GET"))) == expected(url)
