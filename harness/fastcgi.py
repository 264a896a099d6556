"""A minimal FastCGI responder (the protocol nginx speaks to PHP-FPM), for tests behind real nginx.

One thread per connection, so it serves as many concurrent nginx requests as nginx opens. Each
request is recorded (its CGI params, when it started and ended); the server counts requests in
flight and their peak, can take a fixed time per request (``delay``, changeable while it runs, to
model an origin that slows down) and can add response headers (``headers``, e.g. ``X-Cache-Tags``).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

BEGIN, END, PARAMS, STDIN, STDOUT = 1, 3, 4, 5, 6

HeadersFor = Callable[[str], Sequence[tuple[str, str]]]


def record(kind: int, request_id: int, content: bytes) -> bytes:
    return struct.pack("!BBHHBx", 1, kind, request_id, len(content), 0) + content


def read_request(conn: socket.socket) -> tuple[int, dict[bytes, bytes]] | None:
    """Read one FastCGI request from *conn* to its empty STDIN record: (request id, its params)."""
    reader = conn.makefile("rb")
    params = b""
    request_id = 1
    while True:
        header = reader.read(8)
        if len(header) < 8:
            return None
        _, kind, request_id, length, padding = struct.unpack("!BBHHBx", header)
        content = reader.read(length)
        reader.read(padding)
        if kind == PARAMS:
            params += content
        elif kind == STDIN and not content:
            return request_id, _params(params)


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


@dataclass
class Request:
    """One request as the origin saw it: its CGI params (decoded), and when it started and ended."""

    params: dict[str, str]
    started: float  # time.monotonic()
    ended: float | None = None
    number: int = 0  # this host + URI's count, as the body says (#N)

    @property
    def uri(self) -> str:
        return self.params.get("REQUEST_URI", "?")

    @property
    def host(self) -> str:
        return self.params.get("HTTP_HOST", "")

    @property
    def user_agent(self) -> str:
        return self.params.get("HTTP_USER_AGENT", "")

    @property
    def cookie(self) -> str | None:
        return self.params.get("HTTP_COOKIE")

    @property
    def method(self) -> str:
        return self.params.get("REQUEST_METHOD", "")


@dataclass
class _Gauge:
    current: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class FastCGIServer:
    """Answers every request 200 with a page naming the host, the URI and their count (``#N``), so a
    refreshed page differs from the one cached before; ``hits`` counts requests per ``host + URI``.

    *delay*: seconds each request takes (read at the start of each request, so a test may change it
    at run time). *headers*: extra response headers, or a function of the URI returning them.
    """

    def __init__(
        self,
        delay: float = 0.0,
        headers: Sequence[tuple[str, str]] | HeadersFor = (),
        backlog: int = 1024,
    ) -> None:
        self.delay = delay
        self.headers = headers
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port: int = self.sock.getsockname()[1]
        self.hits: Counter[str] = Counter()
        self.requests: list[Request] = []
        self._gauge = _Gauge()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    # --- what it saw ---------------------------------------------------------------------------

    @property
    def current(self) -> int:
        """Requests in flight now."""
        with self._gauge.lock:
            return self._gauge.current

    @property
    def peak(self) -> int:
        """The most requests in flight at once since the start or the last :meth:`reset_peak`."""
        with self._gauge.lock:
            return self._gauge.peak

    def reset_peak(self) -> None:
        with self._gauge.lock:
            self._gauge.peak = self._gauge.current

    def seen(self, since: int = 0, user_agent: str | None = None) -> list[Request]:
        """Requests from index *since* on (``len(server.requests)`` taken earlier marks a point in time);
        with *user_agent*, only those whose User-Agent starts with it."""
        with self._gauge.lock:
            found = self.requests[since:]
        if user_agent is not None:
            found = [r for r in found if r.user_agent.startswith(user_agent)]
        return found

    def mark(self) -> int:
        """A point in time for :meth:`seen`."""
        with self._gauge.lock:
            return len(self.requests)

    def close(self) -> None:
        self.sock.close()

    # --- serving -------------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                self._answer(conn)
            except OSError:
                return  # nginx gave up on the request (its timeout) or closed the connection

    def _answer(self, conn: socket.socket) -> None:
        read = read_request(conn)
        if read is None:
            return
        request_id, params = read
        decoded = {k.decode("latin-1"): v.decode("latin-1") for k, v in params.items()}
        request = Request(decoded, time.monotonic())
        with self._gauge.lock:
            self.hits[request.host + request.uri] += 1
            request.number = self.hits[request.host + request.uri]
            self.requests.append(request)
            self._gauge.current += 1
            self._gauge.peak = max(self._gauge.peak, self._gauge.current)
        try:
            delay = self.delay
            if delay > 0:
                time.sleep(delay)
            extra = self.headers(request.uri) if callable(self.headers) else self.headers
            head = "Status: 200 OK\r\nContent-Type: text/html\r\n"
            head += "".join(f"{name}: {value}\r\n" for name, value in extra)
            body = f"<html>page {request.host}{request.uri} #{request.number}</html>".encode()
            conn.sendall(
                record(STDOUT, request_id, head.encode("latin-1") + b"\r\n" + body)
                + record(STDOUT, request_id, b"")
                + record(END, request_id, b"\0\0\0\0\0\0\0\0")
            )
        finally:
            with self._gauge.lock:
                self._gauge.current -= 1
                request.ended = time.monotonic()


def overlap(requests: Sequence[Request], after: float = float("-inf")) -> int:
    """The most of *requests* in flight at once, counting only requests that started at or after *after*."""
    events: list[tuple[float, int]] = []
    for r in requests:
        if r.started >= after:
            events.append((r.started, 1))
            events.append((r.ended if r.ended is not None else float("inf"), -1))
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most
