"""The purge wire protocol, in memory: replies, order, framing, limits, idle timeout."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from cachesvc.purge.protocol import ERROR, SUCCESS, PurgeFactory, PurgeProtocol


class RecordingTransport(StringTransport):
    """Keeps every write separately, to prove that a reply is one write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class ManualPurger:
    """Purges complete when the test says so."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.pending: list[Deferred[bool]] = []

    def purge(self, raw: bytes) -> Deferred[bool]:
        self.requests.append(raw)
        d: Deferred[bool] = Deferred()
        self.pending.append(d)
        return d


def connect(idle: float = 30.0, max_line: int = 4096) -> tuple[PurgeProtocol, RecordingTransport, ManualPurger, Clock]:
    purger, clock = ManualPurger(), Clock()
    factory = PurgeFactory(purger, clock, idle, max_line)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = RecordingTransport()
    proto.makeConnection(transport)
    return proto, transport, purger, clock


def test_reply_is_one_write_after_the_purge_finished() -> None:
    proto, transport, purger, _ = connect()
    proto.dataReceived(b"/cache/example.com\n")
    assert purger.requests == [b"/cache/example.com"]
    assert transport.writes == []  # nothing before the deletion is done
    purger.pending[0].callback(True)
    assert transport.writes == [SUCCESS]


def test_failed_purge_answers_error_and_keeps_serving() -> None:
    proto, transport, purger, _ = connect()
    proto.dataReceived(b"/cache/a\n")
    purger.pending[0].callback(False)
    proto.dataReceived(b"/cache/b\n")
    purger.pending[1].callback(True)
    assert transport.writes == [ERROR, SUCCESS]
    assert not transport.disconnecting


def test_lines_are_answered_in_order_even_when_split_and_pipelined() -> None:
    proto, transport, purger, _ = connect()
    proto.dataReceived(b"/cache/a\r\n/cache/")
    proto.dataReceived(b"b\n\n/cache/c\n")
    assert purger.requests == [b"/cache/a"]  # one at a time per connection
    purger.pending[0].callback(False)
    purger.pending[1].callback(True)
    purger.pending[2].callback(False)  # the empty line still goes to the purger, which refuses it
    purger.pending[3].callback(True)
    assert purger.requests == [b"/cache/a", b"/cache/b", b"", b"/cache/c"]
    assert transport.writes == [ERROR, SUCCESS, ERROR, SUCCESS]


def test_path_without_newline_is_purged_when_the_peer_closes() -> None:
    proto, transport, purger, _ = connect()
    proto.dataReceived(b"/cache/example.com")
    assert purger.requests == []
    proto.connectionLost()
    assert purger.requests == [b"/cache/example.com"]
    purger.pending[0].callback(True)
    assert transport.writes == []  # nobody to answer


def test_overlong_line_answers_error_then_closes() -> None:
    proto, transport, purger, _ = connect(max_line=10)
    proto.dataReceived(b"/cache/abc\n")  # exactly 10 bytes: accepted
    proto.dataReceived(b"/cache/abcd\n/cache/x\n")  # 11 bytes: refused, and the rest is dropped
    assert purger.requests == [b"/cache/abc"]
    assert not transport.disconnecting  # the earlier reply goes first
    purger.pending[0].callback(True)
    assert transport.writes == [SUCCESS, ERROR]
    assert transport.disconnecting
    assert purger.requests == [b"/cache/abc"]


def test_overlong_line_without_newline_is_cut_off() -> None:
    proto, transport, purger, _ = connect(max_line=10)
    proto.dataReceived(b"/cache/" + b"x" * 20)
    assert transport.writes == [ERROR] and transport.disconnecting
    proto.connectionLost()
    assert purger.requests == []


def test_carriage_return_does_not_count_towards_the_limit() -> None:
    proto, transport, purger, _ = connect(max_line=10)
    proto.dataReceived(b"/cache/abc\r\n")
    assert purger.requests == [b"/cache/abc"]


def test_idle_connection_closes_after_timeout_but_not_during_a_purge() -> None:
    proto, transport, purger, clock = connect(idle=5)
    clock.advance(4)
    proto.dataReceived(b"/cache/a\n")
    clock.advance(100)  # a slow purge is not idleness
    assert not transport.disconnecting
    purger.pending[0].callback(True)
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_idle_timeout_from_connect() -> None:
    proto, transport, purger, clock = connect(idle=30)
    clock.advance(29.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_a_client_that_half_closes_after_its_lines_still_gets_every_reply() -> None:
    proto, transport, purger, _ = connect()
    proto.dataReceived(b"/cache/a\n/cache/b")  # socat-style: the last line without newline, then EOF
    proto.readConnectionLost()
    assert not transport.disconnecting  # the replies are still to come
    purger.pending[0].callback(True)
    assert purger.requests == [b"/cache/a", b"/cache/b"]
    assert not transport.disconnecting
    purger.pending[1].callback(False)
    assert transport.writes == [SUCCESS, ERROR]
    assert transport.disconnecting  # everything answered: closed


def test_a_half_close_with_nothing_sent_closes_and_a_lost_write_side_aborts() -> None:
    proto, transport, purger, _ = connect()
    proto.readConnectionLost()
    assert transport.disconnecting and purger.requests == []  # nothing was sent: nothing to answer
    proto2, transport2, purger2, _ = connect()
    proto2.dataReceived(b"/cache/a\n")
    proto2.writeConnectionLost()
    assert transport2.disconnected or transport2.disconnecting
