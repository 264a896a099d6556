"""One nginx cache file: its version 5 header, its key, and the in-place rewrite that expires it.

The header (``ngx_http_file_cache_header_t``, 336 bytes on LP64, little-endian) is followed by
``\\nKEY: <key>\\n``. nginx reads the header again on every hit and compares ``valid_sec`` with
the current time, so writing a time in the past at offset 8 makes the next request ``STALE`` (or
``EXPIRED``) without touching the body. Blocking: worker threads only.
"""

from __future__ import annotations

import errno
import os
import re
import struct
from typing import NamedTuple

VERSION = 5
HEADER = struct.Struct("<Q5qIHHHB128sB128s16s4x")
"""version, valid_sec, updating_sec, error_sec, last_modified, date, crc32, valid_msec,
header_start, body_start, etag_len, etag, vary_len, vary, variant (and the struct's padding)."""
HEADER_SIZE = HEADER.size  # 336
VALID_SEC = struct.Struct("<q")
VALID_SEC_OFFSET = 8
KEY_MARK = b"\nKEY: "
FIRST_READ = 1024
MAX_HEAD = 64 * 1024
PAST = 2
"""Seconds before now written as ``valid_sec``: nginx's clock is cached per event-loop turn, and a
time one second back could still read as "now" across a second boundary."""

ENTRY_NAME = re.compile(r"[0-9a-f]{32}")
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
WRITE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class Entry(NamedTuple):
    """What the header says of a version 5 cache file (a tuple: one is made per file a walk reads)."""

    valid_sec: int
    date: int
    key: bytes | None  # None: the key line runs past MAX_HEAD


def pack_header(valid_sec: int, date: int, key: bytes, headers: bytes = b"") -> bytes:
    """A version 5 header, key line and stored response *headers* as nginx writes them: all before the body.

    For tests, benchmarks and the harness.
    """
    key_line = KEY_MARK + key + b"\n"
    header_start = HEADER_SIZE + len(key_line)
    body_start = header_start + len(headers)
    fields = (VERSION, valid_sec, 0, 0, -1, date, 0, 0, header_start, body_start, 0, b"", 0, b"", b"")
    return HEADER.pack(*fields) + key_line + headers


V5 = VERSION.to_bytes(8, "little")
"""The version field as its 8 bytes: a walk compares it without unpacking."""
KEY_AT = slice(HEADER_SIZE, HEADER_SIZE + len(KEY_MARK))


def parse(head: bytes) -> Entry | None:
    """The :class:`Entry` *head* (a file's first bytes) starts, or ``None`` if it is no version 5 cache file."""
    if head[:8] != V5 or head[KEY_AT] != KEY_MARK:
        return None
    start = HEADER_SIZE + len(KEY_MARK)
    end = head.find(b"\n", start)
    return Entry(
        int.from_bytes(head[8:16], "little", signed=True),
        int.from_bytes(head[40:48], "little", signed=True),
        head[start:end] if end >= 0 else None,
    )


def header_region(head: bytes) -> tuple[int, int]:
    """(``header_start``, ``body_start``) of a version 5 header: where the stored upstream headers are."""
    return int.from_bytes(head[54:56], "little"), int.from_bytes(head[56:58], "little")


def key_anywhere(head: bytes) -> bytes | None:
    """The key after the first ``\\nKEY: `` in *head*, whatever the header before it (other builds' sizes)."""
    start = head.find(KEY_MARK)
    if start < 0:
        return None
    start += len(KEY_MARK)
    end = head.find(b"\n", start)
    return head[start:end] if end >= 0 else None


def read_head(fd: int) -> bytes:
    """The first bytes of open file *fd*: at least to the end of the key line, when there is one in MAX_HEAD."""
    head = os.pread(fd, FIRST_READ, 0)
    mark = head.find(KEY_MARK)
    while len(head) < MAX_HEAD and len(head) % FIRST_READ == 0 and head and (
        mark < 0 or head.find(b"\n", mark + len(KEY_MARK)) < 0
    ):
        more = os.pread(fd, FIRST_READ, len(head))
        if not more:
            break
        head += more
        mark = head.find(KEY_MARK) if mark < 0 else mark
    return head


def expire(fd: int, now: float) -> None:
    """Write a ``valid_sec`` of ``now - PAST`` into open file *fd*: one ``pwrite`` of 8 bytes."""
    os.pwrite(fd, VALID_SEC.pack(int(now) - PAST), VALID_SEC_OFFSET)


def is_fresh(entry: Entry, now: float) -> bool:
    """Whether nginx would still serve *entry* as fresh (not yet expired) at *now*."""
    return entry.valid_sec >= int(now)


def unlink_quietly(dir_fd: int, name: str) -> bool:
    """Unlink *name* (a file, or a symlink as a link); whether it was there."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        return False  # replaced by a directory since it was listed: the walk's business, not ours


def open_entry(dir_fd: int, name: str, flags: int) -> int | None:
    """Open *name* without following a symlink; ``None`` if it vanished, ``-1`` if it is a symlink now."""
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return -1
        raise
