"""The Dispatcher in-process: EdgeComet's exact request, the status it reports, and its timeout.

Driven with ``treq.testing.StubTreq`` over a small twisted.web resource that records every request
it gets, so no socket and no reactor are involved; the timeout runs on a ``Clock``.
"""

from __future__ import annotations

from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from cachesvc.recache.dispatch import Dispatcher, Gateway

KEY = "test-internal-auth-key"
GATEWAY = Gateway("eg-1", "http://10.0.0.5:10071")


class RecordingGateway(Resource):
    """Answers every request with *status* (or never, when *status* is None) and records what it got."""

    isLeaf = True

    def __init__(self, status: int | None = 200) -> None:
        super().__init__()
        self.status = status
        self.requests: list[dict[str, Any]] = []
        self.pending: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        self.requests.append({
            "method": request.method,
            "uri": request.uri,
            "host": request.getHeader(b"host"),
            "headers": {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()},
            "body": request.content.read(),
        })
        if self.status is None:
            self.pending.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        return b'{"status":"ok"}' if self.status == 200 else b"no"


def timed_out(failure: Failure) -> bool:
    """The request was cut off by the dispatcher's timeout: TimeoutError, CancelledError, or treq's
    ResponseNeverReceived/ResponseFailed whose reasons are that cancellation."""
    if failure.check(TimeoutError, CancelledError):
        return True
    if failure.check(ResponseNeverReceived, ResponseFailed):
        return any(reason.check(CancelledError, TimeoutError) for reason in failure.value.reasons)
    return False


def dispatcher(
    resource: Resource, clock: Clock | None = None, timeout: float = 60.0
) -> tuple[Dispatcher, StubTreq, Clock]:
    stub = StubTreq(resource)
    clock = clock or Clock()
    return Dispatcher(stub, clock, KEY, timeout), stub, clock  # type: ignore[arg-type]


def send(resource: RecordingGateway, url: str, host_id: int = 1, dimension_id: int = 1) -> int:
    d, stub, _ = dispatcher(resource)
    result = d.send(GATEWAY, url, host_id, dimension_id)
    stub.flush()
    return int(SynchronousTestCase().successResultOf(result))


def test_the_exact_request_edgecomet_sends() -> None:
    gateway = RecordingGateway(200)
    assert send(gateway, "https://example.com/page1", 1, 1) == 200
    [got] = gateway.requests
    assert got["method"] == b"POST"
    assert got["uri"] == b"/internal/cache/recache"
    assert got["host"] == b"10.0.0.5:10071"
    assert got["headers"][b"x-internal-auth"] == [KEY.encode()]
    assert got["headers"][b"content-type"] == [b"application/json"]
    assert got["body"] == b'{"url":"https://example.com/page1","host_id":1,"dimension_id":1}'


@pytest.mark.parametrize(
    "url, encoded",
    [
        # Go's encoding/json is HTML-safe: <, > and & as \u003c, \u003e, \u0026.
        ("https://example.com/p?a=1&b=<x>", rb'"https://example.com/p?a=1\u0026b=\u003cx\u003e"'),
        # Non-ASCII stays raw UTF-8, except U+2028 and U+2029, which Go escapes.
        ("https://example.com/caf\u00e9/\u65e5", '"https://example.com/caf\u00e9/\u65e5"'.encode()),
        ("https://example.com/a\u2028b\u2029c", rb'"https://example.com/a\u2028b\u2029c"'),
        # Quotes, backslashes and control characters.
        ('https://example.com/"q"\\\t\x01', rb'"https://example.com/\"q\"\\\t\u0001"'),
    ],
)
def test_body_uses_go_json_escaping_in_field_order(url: str, encoded: bytes) -> None:
    gateway = RecordingGateway(200)
    assert send(gateway, url, 12, 3) == 200
    assert gateway.requests[0]["body"] == b'{"url":' + encoded + b',"host_id":12,"dimension_id":3}'


@pytest.mark.parametrize("status", [200, 500, 404, 400, 503])
def test_reports_the_gateway_status(status: int) -> None:
    gateway = RecordingGateway(status)
    assert send(gateway, "https://example.com/x", 2, 0) == status
    assert len(gateway.requests) == 1


def test_each_send_is_one_request_to_that_gateway() -> None:
    gateway = RecordingGateway(200)
    d, stub, _ = dispatcher(gateway)
    other = Gateway("eg-2", "http://10.0.0.6:10071")
    results = [d.send(GATEWAY, "https://example.com/a", 1, 1), d.send(other, "https://example.com/b", 1, 2),
               d.send(GATEWAY, "https://example.com/c", 2, 0)]
    stub.flush()
    assert [r.result for r in results] == [200, 200, 200]
    assert [(r["host"], r["body"]) for r in gateway.requests] == [
        (b"10.0.0.5:10071", b'{"url":"https://example.com/a","host_id":1,"dimension_id":1}'),
        (b"10.0.0.6:10071", b'{"url":"https://example.com/b","host_id":1,"dimension_id":2}'),
        (b"10.0.0.5:10071", b'{"url":"https://example.com/c","host_id":2,"dimension_id":0}'),
    ]


def test_timeout_fails_a_request_that_never_answers() -> None:
    gateway = RecordingGateway(None)
    d, stub, clock = dispatcher(gateway, timeout=60.0)
    result = d.send(GATEWAY, "https://example.com/slow", 1, 1)
    stub.flush()
    assert len(gateway.pending) == 1  # the gateway has the request and holds it
    clock.advance(59.9)
    assert not result.called
    clock.advance(0.2)
    assert result.called
    failures: list[Any] = []
    result.addErrback(failures.append)
    assert len(failures) == 1
    assert timed_out(failures[0]), failures[0]


def test_timeout_before_the_headers_is_reported_as_a_timeout() -> None:
    gateway = RecordingGateway(None)
    d, stub, clock = dispatcher(gateway, timeout=60.0)
    result = d.send(GATEWAY, "https://example.com/slow", 1, 1)
    stub.flush()
    clock.advance(61)
    failures: list[Any] = []
    result.addErrback(failures.append)
    assert failures and failures[0].check(TimeoutError), failures


def test_timeout_covers_the_body_not_only_the_headers() -> None:
    """treq's own timeout stops at the headers; a gateway that sends headers and stalls must time out too."""

    class HeadersThenStall(RecordingGateway):
        def render(self, request: Request) -> bytes | int:
            super().render(request)
            request.setResponseCode(200)
            request.setHeader(b"content-length", b"100")
            request.write(b"partial")
            return NOT_DONE_YET

    gateway = HeadersThenStall(None)
    d, stub, clock = dispatcher(gateway, timeout=5.0)
    result = d.send(GATEWAY, "https://example.com/slow-body", 1, 1)
    stub.flush()
    assert len(gateway.pending) == 1 and not result.called
    clock.advance(5.1)
    failures: list[Any] = []
    result.addErrback(failures.append)
    assert len(failures) == 1 and timed_out(failures[0]), failures


def test_answer_within_the_timeout_is_not_failed_later() -> None:
    gateway = RecordingGateway(None)
    d, stub, clock = dispatcher(gateway, timeout=10.0)
    result = d.send(GATEWAY, "https://example.com/late", 1, 1)
    stub.flush()
    clock.advance(9)
    [request] = gateway.pending
    request.setResponseCode(200)
    request.write(b"ok")
    request.finish()
    stub.flush()
    assert result.result == 200
    clock.advance(5)  # the timeout's call was cancelled: nothing left to fire
    assert clock.getDelayedCalls() == []


def test_close_without_a_pool_succeeds() -> None:
    d, _, _ = dispatcher(RecordingGateway())
    closed = d.close()
    assert closed.called and closed.result is None
