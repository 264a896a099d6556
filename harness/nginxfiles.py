"""Cache files laid out and formatted as nginx writes them (version 5 headers), for tests and benchmarks."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from cachesvc.purge import cachefile

FRESH_UNTIL = 2**40  # a valid_sec far in the future: fresh for as long as any test runs
HEADER = cachefile.HEADER.pack(cachefile.VERSION, FRESH_UNTIL, 0, 0, -1, 0, 0, 0, 0, 0, 0, b"", 0, b"", b"")
"""A version 5 header without its key line (336 bytes)."""


def entry_path(zone: Path, key: str, levels: tuple[int, ...] = (1, 2)) -> Path:
    digest = hashlib.md5(key.encode()).hexdigest()
    end, parts = len(digest), []
    for width in levels:
        parts.append(digest[end - width : end])
        end -= width
    return zone.joinpath(*parts, digest)


def write_entry(
    zone: Path,
    key: str,
    levels: tuple[int, ...] = (1, 2),
    body: bytes = b"<html>cached</html>",
    valid_sec: int = FRESH_UNTIL,
    date: int | None = None,
    headers: str = "",
) -> Path:
    """A cache file for *key*; *headers* are extra response header lines (``"X-Cache-Tags: a b\\r\\n"``)."""
    path = entry_path(zone, key, levels)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = f"Status: 200 OK\r\nContent-Type: text/html\r\n{headers}\r\n".encode()
    head = cachefile.pack_header(valid_sec, int(time.time()) if date is None else date, key.encode(), stored)
    path.write_bytes(head + body)
    os.chmod(path, 0o600)
    return path


def valid_sec(path: Path) -> int:
    """The ``valid_sec`` field of the cache file at *path*."""
    with path.open("rb") as f:
        return int(cachefile.VALID_SEC.unpack(f.read(16)[8:16])[0])


def make_fresh(paths: list[Path], seconds: int = 3600) -> None:
    """Set every entry's ``valid_sec`` *seconds* ahead, in place (as nginx never does; benchmarks reset with it)."""
    ahead = cachefile.VALID_SEC.pack(int(time.time()) + seconds)
    for path in paths:
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, ahead, cachefile.VALID_SEC_OFFSET)
        os.close(fd)


def count_expired(paths: list[Path]) -> int:
    """How many of the entries at *paths* have a ``valid_sec`` in the past."""
    now = time.time()
    count = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        count += cachefile.VALID_SEC.unpack(os.pread(fd, cachefile.VALID_SEC.size, cachefile.VALID_SEC_OFFSET))[0] < now
        os.close(fd)
    return count
