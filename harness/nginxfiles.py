"""Cache files laid out and formatted as nginx writes them, for tests and benchmarks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HEADER = bytes(range(256)) + b"\x00" * 80  # stands in for nginx's binary header (varies by build)


def write_entry(zone: Path, key: str, levels: tuple[int, ...] = (1, 2), body: bytes = b"<html>cached</html>") -> Path:
    digest = hashlib.md5(key.encode()).hexdigest()
    end, parts = len(digest), []
    for width in levels:
        parts.append(digest[end - width : end])
        end -= width
    directory = zone.joinpath(*parts)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / digest
    path.write_bytes(
        HEADER + b"\nKEY: " + key.encode() + b"\nHTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + body
    )
    os.chmod(path, 0o600)
    return path
