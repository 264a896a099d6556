"""HTTP plumbing for the API: connections, deadlines, body limit, auth before routing, the JSON envelope.

Routing is by exact method and path, as in the Go daemon: a known path with another method, or a
trailing slash, is 404. Every request needs ``X-Internal-Auth`` (even unknown paths) except the
bare ``GET /healthz`` probe; the first of several such headers counts, as Go's ``Header.Get``.

What a client can hold is bounded before any handler runs (:class:`ApiSite`, :class:`ApiChannel`,
:class:`ApiRequest`):

- at most ``max_connections`` open connections; more are closed as soon as they are accepted;
- the key is checked on the headers: a request with a body and no valid key is answered 401 and
  its connection closed before a byte of the body is read;
- a body is kept in memory (never in a temporary file), and only up to ``max_body_size``: a larger
  one answers 413 as soon as that is known;
- ``request_timeout`` runs from a request's first byte (from the accept, for a connection that
  sends nothing): a request not read in full by then answers 408 and is closed; a handler still
  working then answers 503 (its timeout is the time left: a slow or dead Redis gives 503 with a
  clear message, never a hung client); an answer not written ``request_timeout`` later is aborted.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from cachesvc.durations import format_duration
from cachesvc.metrics import Metrics
from cachesvc.recache.gojson import encode_object
from cachesvc.recache.redisclient import RedisError, RedisUnavailable

log = Logger()

REDIS_STATE_ERRORS = ("LOADING", "MISCONF", "READONLY", "MASTERDOWN", "NOREPLICAS")
"""Error replies that mean Redis cannot serve now (not that the request is wrong): 503, like BUSY and OOM."""

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


def redis_refusal(error: RedisError) -> ApiError | None:
    """The 503 for an error reply that is Redis's state (busy, out of memory, loading…), else ``None``."""
    text = str(error).split(" script: ", 1)[0]  # without the script's name and line, when a script met it
    code = text.split(" ", 1)[0]
    if "BUSY" in text:
        return ApiError(503, "redis busy, try again later")
    if code == "OOM":
        return ApiError(503, f"redis out of memory: {text}")
    if code in REDIS_STATE_ERRORS:
        return ApiError(503, f"redis unavailable: {text}")
    return None


class ApiResource(Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, auth_key: str, routes: dict[tuple[bytes, bytes], Handler], reactor: Any,
                 request_timeout: float, healthz: Handler, metrics: Metrics | None = None) -> None:
        Resource.__init__(self)
        self._metrics = metrics
        self._key = auth_key.encode()
        self._routes = routes
        self.reactor = reactor
        self._timeout = request_timeout
        self._healthz = healthz

    def open(self, method: bytes, path: bytes) -> bool:
        """Whether *method* and *path* are the one request answered without a key (the health probe)."""
        return method == b"GET" and path == b"/healthz"

    def authorised(self, headers: Headers, path: bytes) -> bool:
        """Whether *headers* carry the key (the first ``X-Internal-Auth`` counts); a warning when not."""
        values = headers.getRawHeaders(b"x-internal-auth")
        given = values[0] if values else b""
        if not given:
            self.log.warn("Missing X-Internal-Auth header path={path}", path=path.decode("latin-1"))
            return False
        if not hmac.compare_digest(given, self._key):
            self.log.warn("Invalid X-Internal-Auth header path={path}", path=path.decode("latin-1"))
            return False
        return True

    def render(self, request: Request) -> bytes | int:
        for header in (b"server", b"date"):
            request.responseHeaders.removeHeader(header)
        path = request.path
        if self.open(request.method, path):
            self._run(request, self._healthz)
            return NOT_DONE_YET
        if not self.authorised(request.requestHeaders, path):
            return self._send(request, 401, UNAUTHORIZED)
        handler = self._routes.get((request.method, path))
        if handler is None:
            return self._send(request, 404, envelope(False, "not found"))
        self._run(request, handler)
        return NOT_DONE_YET

    def _run(self, request: Request, handler: Handler) -> None:
        deadline: float | None = getattr(request, "deadline", None)  # an ApiRequest's, from its first byte
        timeout = self._timeout if deadline is None else max(0.0, deadline - self.reactor.seconds())
        d: Deferred[Any] = maybeDeferred(handler, request)
        d.addTimeout(timeout, self.reactor)
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
        error = failure.value
        refusal = redis_refusal(error) if isinstance(error, RedisError) else None
        if refusal is not None:
            self.log.warn("{path}: {message}", path=request.path.decode("latin-1"), message=refusal.message)
            error = refusal
        if isinstance(error, ApiError):
            self._send(request, error.status, envelope(False, error.message))
        elif failure.check(RedisUnavailable, TimeoutError):
            message = str(failure.value) if failure.check(RedisUnavailable) else "request timed out waiting for Redis"
            self.log.warn("{path}: {message}", path=request.path.decode("latin-1"), message=message)
            self._send(request, 503, envelope(False, f"redis unavailable: {message}"))
        else:
            self.log.failure("internal error on {path}", failure, path=request.path.decode("latin-1"))
            self._send(request, 500, envelope(False, "internal error"))

    def count(self, method: bytes, path: bytes, status: int) -> None:
        """Record an answer in the metrics, by endpoint (unknown paths as ``other``) and status."""
        if self._metrics is not None:
            known = (method, path) in self._routes or path == b"/healthz"
            endpoint = path.decode("latin-1") if known else "other"
            self._metrics.api_requests.labels(endpoint, str(status)).inc()

    def _send(self, request: Request, status: int, body: bytes) -> bytes | int:
        self.count(request.method, request.path, status)
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


def raw_response(status: bytes, body: bytes) -> bytes:
    """A whole response written straight to the transport, for a request refused before it was read."""
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)


UNAUTHORIZED = envelope(False, "unauthorized")
UNAUTHORIZED_RESPONSE = raw_response(b"401 Unauthorized", UNAUTHORIZED)
ABORT_AFTER = 2.0
"""Seconds a refused or timed-out connection has to take its short answer before it is aborted."""


class ApiRequest(Request):
    """A request judged on its headers: the key, then the body's size; the body is kept in memory."""

    _refused = False
    _received = 0

    def __init__(self, channel: ApiChannel, *args: Any, **kwargs: Any) -> None:
        Request.__init__(self, channel, *args, **kwargs)
        self.api_site = channel.site  # Request.site is only set once the request is read
        self.deadline = channel.deadline

    def gotLength(self, length: int | None) -> None:
        """Called once all headers are in, before any byte of the body (*length* ``None``: chunked)."""
        self.content = BytesIO()
        api = self.api_site.api
        method, uri = getattr(self.channel, "_command", b""), getattr(self.channel, "_path", b"")
        path = uri.split(b"?", 1)[0]
        # A request without a body goes on to the resource, which answers 401 as for any other.
        if length != 0 and not api.open(method, path) and not api.authorised(self.requestHeaders, path):
            api.count(method, path, 401)
            self._refuse(UNAUTHORIZED_RESPONSE)
        elif length is not None and length > self.api_site.max_body:
            self._refuse(self.api_site.too_large)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.api_site.max_body:
            self._refuse(self.api_site.too_large)
            return
        Request.handleContentChunk(self, data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            Request.requestReceived(self, command, path, version)

    def _refuse(self, response: bytes) -> None:
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after the answer
        transport = self.channel.transport
        assert transport is not None  # still receiving this request
        transport.write(response)
        transport.loseConnection()


class ApiChannel(HTTPChannel):
    """An HTTP connection whose requests must be complete within ``request_timeout`` of their first byte.

    The deadline is armed at the accept and at the first byte of each request, and disarmed when its
    response is finished (between requests, the site's idle timeout applies). When it passes: a
    request still being read answers 408 and is closed; one being answered gets ``request_timeout``
    more to finish (the handler's own timeout answers 503 at the deadline), then it is aborted.
    """

    site: ApiSite
    deadline: float | None = None
    _timer: IDelayedCall | None = None
    _state = "idle"  # "reading" from a request's first byte, "answering" once read, "idle" once answered

    def connectionMade(self) -> None:
        HTTPChannel.connectionMade(self)
        self.site.connections += 1
        self._start()  # a connection that sends nothing is closed too

    def dataReceived(self, data: bytes) -> None:
        if data and self._state == "idle":
            self._state = "reading"
            self._start()
        HTTPChannel.dataReceived(self, data)

    def _start(self) -> None:
        """Arm the deadline of the request whose first byte is now (read by :class:`ApiRequest`)."""
        self._arm(self.site.request_timeout, self._expired)
        self.deadline = self.site.reactor.seconds() + self.site.request_timeout

    def allContentReceived(self) -> None:
        self._state = "answering"
        HTTPChannel.allContentReceived(self)

    def requestDone(self, request: Request) -> None:
        self._state = "idle"
        self._disarm()
        HTTPChannel.requestDone(self, request)  # may replay pipelined bytes, the next request's first
        transport = self.transport
        if transport is not None and getattr(transport, "disconnecting", False) and self._timer is None:
            self._arm(self.site.request_timeout, self._abort)  # not persistent: the answer must leave

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        self.site.connections -= 1
        HTTPChannel.connectionLost(self, reason)

    def _arm(self, seconds: float, call: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.site.reactor.callLater(seconds, call)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None:
            return
        if getattr(transport, "disconnecting", False):  # refused, and its answer not taken
            self._abort()
            return
        if self._state == "answering":
            self._arm(self.site.request_timeout, self._abort)
            return
        if self._state == "reading":
            log.info("closing {peer}: request not complete within request_timeout", peer=str(transport.getPeer()))
            transport.write(self.site.timed_out)
        transport.loseConnection()
        self._arm(ABORT_AFTER, self._abort)

    def _abort(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is not None:
            getattr(transport, "abortConnection", transport.loseConnection)()


class ApiSite(Site):
    """The API's site: its connections counted and capped, each an :class:`ApiChannel` of :class:`ApiRequest`."""

    protocol = ApiChannel  # type: ignore[assignment]
    REPORT_EVERY = 10.0  # seconds between warnings while connections are refused

    def __init__(self, resource: ApiResource, max_body: int, request_timeout: float, max_connections: int,
                 reactor: Any = None) -> None:
        # The idle timeout between requests stays Go's 60 s (at least request_timeout). POST bodies
        # are never parsed as forms: Go ignores the Content-Type, and a multipart parse is work and memory.
        Site.__init__(self, resource, requestFactory=ApiRequest, timeout=max(request_timeout, 60.0),
                      reactor=reactor, parsePOSTFormSubmission=False)
        self.noisy = False
        self.displayTracebacks = False
        self.api = resource
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.connections = 0
        self.refused = 0  # connections refused since the last warning
        self._next_report = 0.0
        self.too_large = raw_response(b"413 Request Entity Too Large",
                                      envelope(False, f"request body too large (limit {max_body} bytes)"))
        self.timed_out = raw_response(b"408 Request Timeout", envelope(
            False, f"request not received within request_timeout ({format_duration(request_timeout)})"))

    def log(self, request: http.Request) -> None:
        """One access-log line per request, at debug (twisted.web's own goes to the log at info)."""
        address = request.getClientAddress()
        log.debug("{peer} {method} {uri} {code} {length}", peer=getattr(address, "host", "-"),
                  method=request.method.decode("latin-1"), uri=request.uri.decode("latin-1"),
                  code=request.code, length=request.sentLength)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        """A channel, or ``None`` (the port closes the socket at once) with ``max_connections`` open."""
        if self.connections < self.max_connections:
            return Site.buildProtocol(self, addr)
        self.refused += 1
        now = self.reactor.seconds()
        if now >= self._next_report:
            log.warn("refusing API connections: {open} open, http_api.max_connections is {max}; "
                     "{refused} refused in the last {every:g}s", open=self.connections, max=self.max_connections,
                     refused=self.refused, every=self.REPORT_EVERY)
            self.refused, self._next_report = 0, now + self.REPORT_EVERY
        return None


def make_site(resource: ApiResource, max_body: int, timeout: float, max_connections: int = 256,
              reactor: Any = None) -> ApiSite:
    return ApiSite(resource, max_body, timeout, max_connections, reactor)
