"""Tags in cache files (issue 11): read from files real nginx wrote, and the two-way map of one zone.

The parsing tests put Debian's nginx in front of an origin that answers each URI with FastCGI
``STDOUT`` records given byte for byte (:class:`RawOrigin`), with ``fastcgi_hide_header
X-Cache-Tags`` (:class:`TagStack`), and parse the cache files nginx wrote. nginx stores the
upstream response as it came, FastCGI record headers included (8 bytes before each record's
content), so a header that opens a record is preceded by them on disk. The :class:`ZoneIndex`
tests need no files.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest import mock

import pytest

import harness.nginx
from cachesvc.purge import cachefile
from cachesvc.purge.paths import PathPolicy
from cachesvc.purge.purger import parse_tag_list
from cachesvc.purge.tagindex import ZoneIndex
from cachesvc.purge.tags import DEFAULT_HEADERS, MAX_TAG_BYTES, MAX_TAGS, header_names, parse_tags, read_tagged
from harness.fastcgi import END, STDOUT, FastCGIServer, read_request, record
from harness.nginx import Site, Stack

NAMES = header_names(DEFAULT_HEADERS)
BODY = b"<html>tagged</html>"

# --- real nginx: an origin that sends records as given, a server block that hides the tags ---------------

HIDE = "".join(
    f"            {line}\n"
    for line in ("fastcgi_hide_header X-Cache-Tags;", "fastcgi_buffer_size 16k;", "fastcgi_buffers 8 16k;")
)
TAG_SERVER = harness.nginx.SERVER.replace("{stale}", HIDE + "{stale}")
assert TAG_SERVER != harness.nginx.SERVER


class TagStack(Stack):
    """:class:`harness.nginx.Stack` whose server blocks also say ``fastcgi_hide_header X-Cache-Tags;`` and
    ``fastcgi_buffer_size 16k;`` (1,000 tags do not fit nginx's default 4 KiB header buffer). harness.nginx
    has no option for extra ``location`` lines, so its template is swapped while nginx's config is written."""

    def _start_nginx(self, connections: int) -> None:
        with mock.patch.object(harness.nginx, "SERVER", TAG_SERVER):
            super()._start_nginx(connections)


Chunk = bytes | threading.Event
"""A STDOUT record's content, or an event the origin waits for (at most 30 s) before sending the rest."""


class RawOrigin(FastCGIServer):
    """Answers each URI with the STDOUT records listed for it in *records*, exactly as given."""

    def __init__(self, records: dict[str, Sequence[Chunk]]) -> None:
        self.records = records
        super().__init__()

    def _answer(self, conn: socket.socket) -> None:
        read = read_request(conn)
        if read is None:
            return
        request_id, params = read
        uri = params.get(b"REQUEST_URI", b"").decode("latin-1")
        for chunk in self.records[uri.partition("?")[0]]:
            if isinstance(chunk, threading.Event):
                chunk.wait(30)
            else:
                for at in range(0, len(chunk), 65535):  # a record holds at most 65,535 bytes
                    conn.sendall(record(STDOUT, request_id, chunk[at : at + 65535]))
        conn.sendall(record(STDOUT, request_id, b"") + record(END, request_id, b"\0" * 8))


def response(*headers: str, body: bytes = BODY) -> bytes:
    """A FastCGI response's headers (``Status`` first, as PHP-FPM sends a non-default status) and body."""
    return ("Status: 200 OK\r\nContent-Type: text/html\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode(
        "latin-1"
    ) + body


LONG_OK = "a" * MAX_TAG_BYTES
TOO_LONG = "b" * (MAX_TAG_BYTES + 1)
MANY = [f"t{i}" for i in range(MAX_TAGS + 5)]

# URI: (what the origin sends, the tags expected in nginx's file in order, the tags ignored for the limits)
PAGES: dict[str, tuple[list[Chunk], tuple[str, ...], int]] = {
    "/plain": ([response("X-Cache-Tags: post-42 home term-7")], ("post-42", "home", "term-7"), 0),
    "/separators": ([response("X-Cache-Tags: a,b, c ,, d\te  ,f,")], ("a", "b", "c", "d", "e", "f"), 0),
    "/several": (
        [response("X-Cache-Tags: post-1 home", "Cache-Tag: term-3,term-4", "X-Cache-Tags: post-2 home",
                  "Surrogate-Key: sk-1", "xkey: xk-1", "X-Powered-By: nothing")],
        ("post-1", "home", "term-3", "term-4", "post-2", "sk-1", "xk-1"),
        0,
    ),
    "/case": ([response("x-cache-TAGS: Post-1 post-1 POST-1")], ("Post-1", "post-1", "POST-1"), 0),
    "/lookalikes": (
        [response("X-Cache-Tags-Old: no-1", "X-Cache-Tag: no-2", "X-Other: X-Cache-Tags: no-3", "Tags: no-4")],
        (),
        0,
    ),
    "/untagged": ([response()], (), 0),
    "/long": ([response(f"X-Cache-Tags: ok {LONG_OK} {TOO_LONG} tail")], ("ok", LONG_OK, "tail"), 1),
    "/many": ([response("X-Cache-Tags: " + " ".join(MANY))], tuple(MANY[:MAX_TAGS]), 5),
    "/many-lines": (
        [response("X-Cache-Tags: " + " ".join(MANY[:600]), "Cache-Tag: " + ",".join(MANY[600:]))],
        tuple(MANY[:MAX_TAGS]),
        5,
    ),
    "/late": (  # the tags header beyond the first 1,024 bytes of the file
        [response("X-Filler: " + "f" * 3000, "X-Cache-Tags: late-1 late-2")],
        ("late-1", "late-2"),
        0,
    ),
}

# Responses whose tags header starts a FastCGI record: on disk it follows the record's 8-byte header.
FRAMED: dict[str, tuple[list[Chunk], tuple[str, ...], int]] = {
    "/first": (
        [b"X-Cache-Tags: first-1 first-2\r\nContent-Type: text/html\r\n\r\n" + BODY],
        ("first-1", "first-2"),
        0,
    ),
    "/second-record": (
        [b"Status: 200 OK\r\nContent-Type: text/html\r\n", b"X-Cache-Tags: second-1\r\n\r\n" + BODY],
        ("second-1",),
        0,
    ),
    "/split-line": (
        [b"Status: 200 OK\r\nX-Cache-Tags: split-", b"tag other\r\nContent-Type: text/html\r\n\r\n" + BODY],
        ("split-tag", "other"),
        0,
    ),
}

HOST = "tags.example"


@pytest.fixture(scope="module")
def nginx() -> Iterator[TagStack]:
    records = {uri: chunks for uri, (chunks, _, _) in {**PAGES, **FRAMED}.items()}
    with TagStack([Site(HOST, use_temp_path=False)], fcgi=RawOrigin(records), daemon=False) as stack:
        yield stack


def stored(stack: Stack, uri: str) -> bytes:
    """The cache file nginx wrote for *uri* (requested until it is a HIT)."""
    stack.until_hit(HOST, uri)
    return stack.file(HOST, uri).read_bytes()


def read_file_tags(path: Path) -> tuple[tuple[str, ...], int] | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        tagged = read_tagged(fd, NAMES)
    finally:
        os.close(fd)
    return None if tagged is None else (tagged.tags, tagged.dropped)


@pytest.mark.parametrize("uri", list(PAGES))
def test_tags_in_files_nginx_wrote(nginx: TagStack, uri: str) -> None:
    _, expected, dropped = PAGES[uri]
    data = stored(nginx, uri)
    tagged = parse_tags(data[: cachefile.header_region(data)[1]], NAMES)
    assert tagged is not None, "nginx's file is not read as a cache file"
    assert tagged.entry.key == f"httpGET{HOST}{uri}".encode()
    assert (tagged.tags, tagged.dropped) == (expected, dropped)
    assert read_file_tags(nginx.file(HOST, uri)) == (expected, dropped)  # reading only the header region


@pytest.mark.parametrize("uri", list(FRAMED))
def test_tags_in_a_header_that_starts_a_fastcgi_record(nginx: TagStack, uri: str) -> None:
    """nginx keeps the FastCGI framing in the file: a header that opens a record follows 8 binary bytes."""
    _, expected, dropped = FRAMED[uri]
    data = stored(nginx, uri)
    start, end = cachefile.header_region(data)
    assert data[start : start + 2] == b"\x01\x06", "nginx no longer stores the FastCGI record header"
    assert read_file_tags(nginx.file(HOST, uri)) == (expected, dropped)


def test_the_tags_header_is_hidden_from_visitors_but_stored(nginx: TagStack) -> None:
    stored(nginx, "/plain")
    conn = http.client.HTTPConnection("127.0.0.1", nginx.web_port, timeout=10)
    try:
        conn.request("GET", "/plain", headers={"Host": HOST})
        reply = conn.getresponse()
        reply.read()
        assert reply.getheader("X-Cache-Status") == "HIT"
        assert reply.getheader("X-Cache-Tags") is None
    finally:
        conn.close()
    assert b"X-Cache-Tags: post-42 home term-7\r\n" in nginx.file(HOST, "/plain").read_bytes()


def test_what_nginx_writes_besides_entries_is_no_tagged_entry(nginx: TagStack, tmp_path: Path) -> None:
    """A truncated copy, a body without a header, another version: not cache files (``None``)."""
    data = stored(nginx, "/plain")
    v4 = bytearray(data)
    v4[0] = 4
    for junk in (b"", b"<html>no header</html>", data[:300], bytes(v4)):
        assert parse_tags(junk, NAMES) is None
        path = tmp_path / "junk"
        path.write_bytes(junk)
        assert read_file_tags(path) is None


# --- parsing, without nginx ------------------------------------------------------------------------------


def head(*headers: str) -> bytes:
    stored_headers = ("Status: 200 OK\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode("latin-1")
    return cachefile.pack_header(2**40, 1, b"httpGETa/x", stored_headers)


def test_the_configured_header_names_only() -> None:
    names = header_names(["Surrogate-Key"])
    tagged = parse_tags(head("X-Cache-Tags: a", "surrogate-key: b c"), names)
    assert tagged is not None and tagged.tags == ("b", "c")


def test_a_header_name_of_the_longest_length_the_config_allows() -> None:
    """purge.tags.headers accepts names of up to 64 characters; such a name must be matched too."""
    name = "X-" + "L" * 62
    tagged = parse_tags(head(f"{name}: long-name"), header_names([name]))
    assert tagged is not None and tagged.tags == ("long-name",)


def test_tags_are_the_bytes_a_purge_line_names() -> None:
    """A tag that is not UTF-8 still matches the same bytes in a purge line."""
    raw = "X-Cache-Tags: caf\xe9 ok".encode("latin-1")
    data = cachefile.pack_header(2**40, 1, b"k", b"Status: 200 OK\r\n" + raw + b"\r\n\r\n")
    tagged = parse_tags(data, NAMES)
    assert tagged is not None
    assert set(tagged.tags) == parse_tag_list(b"caf\xe9,ok")


def test_header_values_lose_surrounding_space_and_cr_only() -> None:
    tagged = parse_tags(head("X-Cache-Tags:\t  a-1  \t"), NAMES)
    assert tagged is not None and tagged.tags == ("a-1",)


def test_only_the_stored_headers_are_read() -> None:
    """A tags header in the body (after ``body_start``) or in the key is not the entry's."""
    key = b"httpGETa/?X-Cache-Tags: from-key"
    data = cachefile.pack_header(2**40, 1, key, b"Status: 200 OK\r\n\r\n") + b"X-Cache-Tags: from-body\r\n"
    tagged = parse_tags(data, NAMES)
    assert tagged is not None and tagged.tags == ()


# --- the zone index ------------------------------------------------------------------------------------


def zone_index(tmp_path: Path) -> ZoneIndex:
    root = tmp_path / "cache"
    return ZoneIndex(PathPolicy([str(root)]).target(f"{root}/z".encode()))


def fresh(text: str) -> str:
    """An equal string that is a different object, as each file's parse makes its own."""
    return "".join(list(text))


def test_put_drop_and_carrying(tmp_path: Path) -> None:
    index = zone_index(tmp_path)
    index.put("1/ab/x1", ("home", "post-1"))
    index.put("2/ab/x2", ("home", "post-2"))
    index.put("3/cd/x3", ())
    assert index.carrying(["home"]) == ["1/ab/x1", "2/ab/x2"]
    assert index.carrying(["post-1", "post-2"]) == ["1/ab/x1", "2/ab/x2"]
    assert index.carrying(["post-1", "nothing"]) == ["1/ab/x1"]
    assert index.carrying(["HOME"]) == []  # exact
    assert "3/cd/x3" not in index.entries  # an entry without tags costs nothing
    index.put("1/ab/x1", ("post-9",))  # replaced: only what it says now
    assert index.carrying(["home"]) == ["2/ab/x2"]
    assert index.carrying(["post-1"]) == []
    assert index.carrying(["post-9"]) == ["1/ab/x1"]
    index.drop("2/ab/x2")
    index.drop("never/was/there")
    assert index.carrying(["home", "post-2"]) == []
    assert index.counts() == (1, 1, 1)
    index.put("1/ab/x1", ())
    assert index.counts() == (0, 0, 0) and index.by_tag == {}


def test_carrying_below_a_directory(tmp_path: Path) -> None:
    index = zone_index(tmp_path)
    for name in ("5/cd/a", "5/ce/b", "50/cd/c", "5/cdx/d", "6/cd/e"):
        index.put(name, ("t",))
    assert index.carrying(["t"], "5") == ["5/cd/a", "5/cdx/d", "5/ce/b"]
    assert index.carrying(["t"], "5/cd") == ["5/cd/a"]
    assert index.carrying(["t"], "5/c") == []
    assert index.carrying(["t"], "5/cd/a") == []  # a file is no directory
    assert len(index.carrying(["t"])) == 5


def test_drop_dir_forgets_what_is_below_it_only(tmp_path: Path) -> None:
    index = zone_index(tmp_path)
    for name in ("5/cd/a", "5/cd/b", "5/ce/c", "5/cdx/d", "50/cd/e"):
        index.put(name, ("t", name))
    assert index.drop_dir("5/cd") == 2
    assert index.carrying(["t"]) == ["5/cdx/d", "5/ce/c", "50/cd/e"]
    assert index.drop_dir("5") == 2
    assert index.carrying(["t"]) == ["50/cd/e"]
    assert index.drop_dir("7") == 0
    assert index.counts() == (1, 2, 2)


def test_counts_and_one_string_per_distinct_tag(tmp_path: Path) -> None:
    index = zone_index(tmp_path)
    for i in range(10):
        index.put(f"{i}/aa/e{i}", (fresh("home"), fresh(f"post-{i}"), fresh(f"term-{i % 3}")))
    assert index.counts() == (10, 1 + 10 + 3, 30)
    homes = {id(tags[0]) for tags in index.entries.values()}
    assert len(homes) == 1, "each entry keeps its own copy of a shared tag"
    terms = {id(tags[2]) for tags in index.entries.values() if tags[2] == "term-1"}
    assert len(terms) == 1
    for i in range(10):
        index.drop(f"{i}/aa/e{i}")
    assert index.counts() == (0, 0, 0)
    assert index.by_tag == {} and index.entries == {}
    assert index._canonical == {}, "a tag no entry carries is kept"


def test_a_cold_scan_merges_and_events_during_it_win(tmp_path: Path) -> None:
    index = zone_index(tmp_path)
    index.put("1/aa/kept", ("old",))
    index.put("1/aa/stale", ("old",))  # indexed before the scan, gone when it reads
    index.put("1/aa/dropped", ("old",))
    index.end_scan()
    assert index.whole
    index.begin_scan()
    assert not index.whole and index.scans == 1
    index.put("2/bb/event-new", ("new",))  # seen by an event while the scan runs
    index.put("2/bb/replaced", ("new",))
    index.drop("1/aa/dropped")
    index.merge({"1/aa/kept": ("old", "more"), "2/bb/replaced": ("read-earlier",), "1/aa/dropped": ("old",)})
    assert index.carrying(["read-earlier"]) == []
    assert index.carrying(["new"]) == ["2/bb/event-new", "2/bb/replaced"]
    index.merge({"3/cc/scanned": ("s",), "3/cc/untagged": ()})
    assert not index.whole
    index.end_scan()
    assert index.whole
    assert sorted(index.entries) == ["1/aa/kept", "2/bb/event-new", "2/bb/replaced", "3/cc/scanned"]
    assert index.entries["1/aa/kept"] == ("old", "more")
    assert index.carrying(["old"]) == ["1/aa/kept"]
    assert index.counts() == (4, 4, 5)


def test_end_scan_keeps_entries_events_added_even_if_the_scan_missed_them(tmp_path: Path) -> None:
    index = zone_index(tmp_path)
    index.put("1/aa/before", ("t",))
    index.begin_scan()
    index.put("1/aa/before", ("t",))  # an event refreshed it; the scan's listing had gone past it
    index.put("9/zz/after", ("t",))
    index.merge({})
    index.end_scan()
    assert index.carrying(["t"]) == ["1/aa/before", "9/zz/after"]
    # The next scan starts afresh: what it does not find is gone.
    index.begin_scan()
    index.merge({"9/zz/after": ("t",)})
    index.end_scan()
    assert index.carrying(["t"]) == ["9/zz/after"] and index.scans == 2


def test_an_overflow_makes_the_index_not_whole_until_a_scan_ends(tmp_path: Path) -> None:
    index = zone_index(tmp_path)
    assert not index.whole  # before its first scan
    index.begin_scan()
    index.end_scan()
    index.overflowed()
    assert not index.whole
    index.begin_scan()
    index.merge({})
    index.end_scan()
    assert index.whole


def test_the_index_is_safe_across_threads(tmp_path: Path) -> None:
    index = zone_index(tmp_path)

    def churn(n: int) -> None:
        for i in range(2000):
            index.put(f"{n}/aa/{i}", ("all", f"w{n}"))
            if i % 3 == 0:
                index.drop(f"{n}/aa/{i}")

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for _ in range(200):
        index.carrying(["all"])
        index.counts()
    for t in threads:
        t.join()
    kept = sum(1 for i in range(2000) if i % 3)
    assert index.counts() == (4 * kept, 5, 8 * kept)
    assert len(index.carrying(["all"])) == 4 * kept
