"""The tags a cached page carries: a response header stored in its cache file, read back by the daemon.

The origin labels a response (``X-Cache-Tags: post-42 home term-7``); nginx stores every upstream
header in the cache file, from ``header_start`` to ``body_start``, even those it hides from
visitors. Tags are separated by spaces and/or commas and compared exactly. A header may come
several times; its tags add up. Blocking reads: worker threads only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

from cachesvc.purge import cachefile

MAX_TAGS = 1000
"""Tags kept per entry; the rest are ignored (and the entry logged once)."""

MAX_TAG_BYTES = 1024
"""A longer tag is ignored."""

MAX_HEADERS = 64 * 1024
"""nginx's header region is at most this long (``body_start`` is 16 bits)."""

DEFAULT_HEADERS = ("X-Cache-Tags", "Cache-Tag", "Surrogate-Key", "xkey")


class Tagged(NamedTuple):
    """A version 5 cache file's entry and its tags; *dropped*: tags ignored for the limits."""

    entry: cachefile.Entry
    tags: tuple[str, ...]
    dropped: int = 0


def header_names(names: Sequence[str]) -> tuple[bytes, ...]:
    """Header names as they are matched: lower-case bytes, each followed by ``:``."""
    return tuple(name.lower().encode("latin-1") + b":" for name in names)


def parse_tags(head: bytes, names: tuple[bytes, ...], entry: cachefile.Entry | None = None) -> Tagged | None:
    """The tags in *head* (a cache file's first bytes, up to ``body_start``); ``None`` if not a cache file.

    *entry*: what :func:`cachefile.parse` already made of *head*.
    """
    entry = entry or cachefile.parse(head)
    if entry is None:
        return None
    start, end = cachefile.header_region(head)
    tags: dict[str, None] = {}
    dropped = 0
    for value in _values(_unframed(head[start:end]), names):
        for raw in value.replace(b",", b" ").split():
            if len(raw) > MAX_TAG_BYTES or len(tags) >= MAX_TAGS:
                dropped += 1
                continue
            tags[raw.decode("utf-8", "surrogateescape")] = None
    return Tagged(entry, tuple(tags), dropped)


def _values(region: bytes, names: tuple[bytes, ...]) -> list[bytes]:
    """The values of the header lines named *names* (lower-case, with ``:``) in *region*, in order.

    A cold scan asks this of every file: ``bytes.find`` on a lower-cased copy, not a regular expression.
    """
    lowered = b"\n" + region.lower()
    found: list[tuple[int, bytes]] = []
    for name in names:
        at = lowered.find(b"\n" + name)
        while at >= 0:
            start = at + 1 + len(name)  # in region: at - 1 + 1 + len(name)
            end = lowered.find(b"\n", start)
            value = region[start - 1 : (end - 1) if end >= 0 else len(region)]
            found.append((at, value.rstrip(b"\r")))
            at = lowered.find(b"\n" + name, start)
    found.sort()
    return [value for _, value in found]


def carries(head: bytes, entry: cachefile.Entry, names: tuple[bytes, ...], wanted: frozenset[bytes]) -> bool:
    """Whether the cache file *head* starts (parsed as *entry*) carries any of *wanted* (tags as bytes).

    The question a tag purge asks of each candidate, answered without building its tag list.
    """
    start, end = cachefile.header_region(head)
    return any(not wanted.isdisjoint(v.replace(b",", b" ").split()) for v in _values(_unframed(head[start:end]), names))


def read_head(fd: int) -> tuple[bytes, cachefile.Entry | None]:
    """Blocking: open file *fd*'s first bytes, to the end of its header region, and its entry."""
    head = os.pread(fd, cachefile.FIRST_READ, 0)
    entry = cachefile.parse(head)
    if entry is None:
        return head, None
    _, end = cachefile.header_region(head)
    if end > len(head) and len(head) == cachefile.FIRST_READ:
        head += os.pread(fd, min(end, MAX_HEADERS) - len(head), len(head))
        if entry.key is None:
            entry = cachefile.parse(head)  # the key line ran past the first read
    return head, entry


_FCGI_STDOUT = b"\x01\x06"  # a FastCGI record: version 1, type STDOUT


def _unframed(region: bytes) -> bytes:
    """The stored response headers as text: nginx keeps a FastCGI upstream's answer as it came, in
    records (8-byte header, content, padding), and a header line may span two records."""
    if not region.startswith(_FCGI_STDOUT):
        return region  # proxy_cache and the others store plain HTTP
    out, at = [], 0
    while at + 8 <= len(region) and region[at] == 1 and region[at + 1] in (6, 7):  # STDOUT, STDERR
        length = int.from_bytes(region[at + 4 : at + 6], "big")
        if region[at + 1] == 6:
            out.append(region[at + 8 : at + 8 + length])
        at += 8 + length + region[at + 6]
    return b"".join(out)


def read_tagged(fd: int, names: tuple[bytes, ...]) -> Tagged | None:
    """Blocking: the tags of open file *fd*, reading only its header region."""
    head, entry = read_head(fd)
    return None if entry is None else parse_tags(head, names, entry)
