"""HTTP plumbing for the API: body limit, constant-time auth before routing, the JSON envelope.

Routing is by exact method and path, as in the Go daemon: a known path with another method, or a
trailing slash, is 404. Every request needs ``X-Internal-Auth`` (even unknown paths) except the
bare ``GET /healthz`` probe. Each handler is bounded by ``request_timeout``: a slow or dead Redis
gives 503 with a clear message, never a hung client.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from cachesvc.metrics import Metrics
from cachesvc.recache.gojson import encode_object
from cachesvc.recache.redisclient import RedisError, RedisUnavailable


class ApiError(Exception):
    """An answer other than 200: status code and message, sent in the error envelope."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def envelope(success: bool, message: str = "", data: Any = None) -> bytes:
    """``{"success":…,"message":…,"data":…}`` in Go's field order, empty message and nil data omitted."""
    pairs: list[tuple[str, Any]] = [("success", success)]
    if message:
        pairs.append(("message", message))
    if data is not None:
        pairs.append(("data", data))
    return encode_object(pairs)


class Raw:
    """A body sent as is (``/status`` is not enveloped)."""

    def __init__(self, body: bytes) -> None:
        self.body = body


Handler = Callable[[Request], Any]


class ApiResource(Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, auth_key: str, routes: dict[tuple[bytes, bytes], Handler], reactor: Any,
                 request_timeout: float, healthz: Handler, metrics: Metrics | None = None) -> None:
        Resource.__init__(self)
        self._metrics = metrics
        self._key = auth_key.encode()
        self._routes = routes
        self._reactor = reactor
        self._timeout = request_timeout
        self._healthz = healthz

    def render(self, request: Request) -> bytes | int:
        for header in (b"server", b"date"):
            request.responseHeaders.removeHeader(header)
        path = request.path
        if request.method == b"GET" and path == b"/healthz":
            self._run(request, self._healthz)
            return NOT_DONE_YET
        given = request.getHeader(b"x-internal-auth")
        if not given:
            self.log.warn("Missing X-Internal-Auth header path={path}", path=path.decode("latin-1"))
            return self._send(request, 401, envelope(False, "unauthorized"))
        if not hmac.compare_digest(given, self._key):
            self.log.warn("Invalid X-Internal-Auth header path={path}", path=path.decode("latin-1"))
            return self._send(request, 401, envelope(False, "unauthorized"))
        handler = self._routes.get((request.method, path))
        if handler is None:
            return self._send(request, 404, envelope(False, "not found"))
        self._run(request, handler)
        return NOT_DONE_YET

    def _run(self, request: Request, handler: Handler) -> None:
        d: Deferred[Any] = maybeDeferred(handler, request)
        d.addTimeout(self._timeout, self._reactor)
        d.addCallbacks(lambda result: self._answer(request, result), lambda f: self._fail(request, f))
        d.addErrback(lambda f: self.log.failure("answering {path} failed", f, path=request.path))

    def _answer(self, request: Request, result: Any) -> None:
        if isinstance(result, Raw):
            self._send(request, 200, result.body)
        elif isinstance(result, tuple):
            status, body = result
            self._send(request, status, body)
        else:
            self._send(request, 200, result)

    def _fail(self, request: Request, failure: Failure) -> None:
        if isinstance(failure.value, ApiError):
            self._send(request, failure.value.status, envelope(False, failure.value.message))
        elif failure.check(RedisUnavailable, TimeoutError):
            message = str(failure.value) if failure.check(RedisUnavailable) else "request timed out waiting for Redis"
            self.log.warn("{path}: {message}", path=request.path.decode("latin-1"), message=message)
            self._send(request, 503, envelope(False, f"redis unavailable: {message}"))
        elif failure.check(RedisError) and "BUSY" in str(failure.value):
            self._send(request, 503, envelope(False, "redis busy, try again later"))
        else:
            self.log.failure("internal error on {path}", failure, path=request.path.decode("latin-1"))
            self._send(request, 500, envelope(False, "internal error"))

    def _send(self, request: Request, status: int, body: bytes) -> bytes | int:
        if self._metrics is not None:
            known = (request.method, request.path) in self._routes or request.path == b"/healthz"
            endpoint = request.path.decode("latin-1") if known else "other"
            self._metrics.api_requests.labels(endpoint, str(status)).inc()
        if request.finished or request.channel is None:
            return b""
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", str(len(body)).encode())
        if request.startedWriting:
            return b""
        request.write(body)
        request.finish()
        return NOT_DONE_YET


def limited_request(max_body: int) -> type[Request]:
    """A Request class that answers 413 as soon as a body is known to exceed *max_body* bytes."""
    too_large = envelope(False, f"request body too large (limit {max_body} bytes)")
    response = (
        b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(too_large)
        + too_large
    )

    class LimitedRequest(Request):
        _refused = False
        _received = 0

        def gotLength(self, length: int | None) -> None:
            if length is not None and length > max_body:
                self._refuse()
                return
            Request.gotLength(self, length)

        def handleContentChunk(self, data: bytes) -> None:
            if self._refused:
                return
            self._received += len(data)
            if self._received > max_body:
                self._refuse()
                return
            Request.handleContentChunk(self, data)

        def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
            if not self._refused:
                Request.requestReceived(self, command, path, version)

        def _refuse(self) -> None:
            self._refused = True
            transport = self.channel.transport
            assert transport is not None  # still receiving this request
            transport.write(response)
            transport.loseConnection()

    return LimitedRequest


def make_site(resource: Resource, max_body: int, timeout: float) -> Site:
    site = Site(resource, requestFactory=limited_request(max_body), timeout=max(timeout, 60.0))
    site.noisy = False
    site.displayTracebacks = False
    return site
