"""A minimal FastCGI responder (the protocol nginx speaks to PHP-FPM), for tests behind real nginx."""

from __future__ import annotations

import socket
import struct
import threading
from collections import Counter

BEGIN, END, PARAMS, STDIN, STDOUT = 1, 3, 4, 5, 6


def _record(kind: int, request_id: int, content: bytes) -> bytes:
    return struct.pack("!BBHHBx", 1, kind, request_id, len(content), 0) + content


def _params(data: bytes) -> dict[bytes, bytes]:
    out, i = {}, 0
    while i < len(data):
        sizes = []
        for _ in range(2):
            n = data[i]
            if n >> 7:
                n = struct.unpack("!I", data[i : i + 4])[0] & 0x7FFFFFFF
                i += 4
            else:
                i += 1
            sizes.append(n)
        name, value = data[i : i + sizes[0]], data[i + sizes[0] : i + sizes[0] + sizes[1]]
        i += sizes[0] + sizes[1]
        out[name] = value
    return out


class FastCGIServer:
    """Answers every request 200 with a page naming the URI; counts requests per URI."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.hits: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            reader = conn.makefile("rb")
            params = b""
            request_id = 1
            while True:
                header = reader.read(8)
                if len(header) < 8:
                    return
                _, kind, request_id, length, padding = struct.unpack("!BBHHBx", header)
                content = reader.read(length)
                reader.read(padding)
                if kind == PARAMS:
                    params += content
                elif kind == STDIN and not content:
                    break
            uri = _params(params).get(b"REQUEST_URI", b"?").decode()
            self.hits[uri] += 1
            body = f"<html>page {uri} #{self.hits[uri]}</html>".encode()
            reply = b"Status: 200 OK\r\nContent-Type: text/html\r\n\r\n" + body
            conn.sendall(
                _record(STDOUT, request_id, reply)
                + _record(STDOUT, request_id, b"")
                + _record(END, request_id, b"\0\0\0\0\0\0\0\0")
            )
