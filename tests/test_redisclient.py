"""RedisClient in-process: its own pool, reconnecting after every failure (AUTH's included), a deadline on each call.

Most tests run on a ``MemoryReactorClock``: each connection attempt the client makes is one entry of
``reactor.tcpClients``, which a test accepts (on a ``StringTransport``, answering in RESP by hand) or
refuses, so the backoff and the bytes on the wire are checked exactly. The last tests run against a
real ``redis-server`` of their own (a password set and changed with ``CONFIG SET``, a restart, a
stopped process) in the test reactor, each wait bounded.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import redis as redis_py
from twisted.internet import reactor as global_reactor
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cachesvc.recache.redisclient import RedisClient, RedisError, RedisUnavailable, Script
from harness.redis_server import RedisServer

ADDR = "127.0.0.1:6379"
WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
_sync = SynchronousTestCase()


def resp(*args: bytes | str) -> bytes:
    """A command as RESP, the way it goes on the wire."""
    out = b"*%d\r\n" % len(args)
    for a in args:
        raw = a.encode() if isinstance(a, str) else a
        out += b"$%d\r\n%s\r\n" % (len(raw), raw)
    return out


class Wire:
    """The client's connection attempts on a MemoryReactorClock, accepted or refused by the test."""

    def __init__(self, password: str = "secret", db: int = 2, timeout: float = 3.0) -> None:
        self.reactor = MemoryReactorClock()
        self.client = RedisClient(ADDR, password, db, self.reactor, timeout=timeout)
        self.password = password
        self.seen = 0

    def new_attempts(self) -> list[Any]:
        """The factories of the attempts made since the last look."""
        factories = [entry[2] for entry in self.reactor.tcpClients[self.seen:]]
        self.seen = len(self.reactor.tcpClients)
        assert all(entry[:2] == ("127.0.0.1", 6379) for entry in self.reactor.tcpClients)
        return factories

    @staticmethod
    def accept(factory: Any) -> tuple[Any, StringTransport]:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def up(self, factory: Any) -> tuple[Any, StringTransport]:
        """Accept *factory*'s attempt and pass its AUTH and SELECT."""
        protocol, transport = self.accept(factory)
        if self.password:
            protocol.dataReceived(b"+OK\r\n")  # AUTH
        transport.clear()
        protocol.dataReceived(b"+OK\r\n")  # SELECT: up, and what waited for it is written now
        return protocol, transport

    def refuse_all(self) -> None:
        for factory in self.new_attempts():
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.reactor.advance(0.3)  # HostnameEndpoint reports a failure at its next attempt tick (0.3 s)

    def wrong_password_all(self) -> int:
        factories = self.new_attempts()
        for factory in factories:
            protocol, transport = self.accept(factory)
            protocol.dataReceived(WRONGPASS)
            assert transport.disconnecting  # closed at once
            protocol.connectionLost(Failure(ConnectionDone()))
        return len(factories)


def failure_of(d: Deferred[Any]) -> Failure:
    return _sync.failureResultOf(d, RedisUnavailable)


# --- the handshake and the reasons ---------------------------------------------------------------


def test_auth_then_select_on_every_connection_and_replies_as_bytes() -> None:
    wire = Wire()
    wire.client.startService()
    factories = wire.new_attempts()
    assert len(factories) == RedisClient.poolsize
    protocol, transport = wire.accept(factories[0])
    assert transport.value() == resp("AUTH", "secret")
    transport.clear()
    protocol.dataReceived(b"+OK\r\n")
    assert transport.value() == resp("SELECT", "2")
    protocol.dataReceived(b"+OK\r\n")
    transport.clear()
    got = wire.client.call("GET", b"k")
    assert transport.value() == resp("GET", "k")
    protocol.dataReceived(b"$2\r\n\xff\x00\r\n")
    assert _sync.successResultOf(got) == b"\xff\x00"  # charset=None: the stored bytes


def test_no_password_no_auth() -> None:
    wire = Wire(password="", db=0)
    wire.client.startService()
    protocol, transport = wire.accept(wire.new_attempts()[0])
    assert transport.value() == resp("SELECT", "0")


def test_a_wrong_password_is_the_reason_at_once_and_is_tried_again_with_backoff() -> None:
    wire = Wire()
    wire.client.startService()
    assert wire.wrong_password_all() == RedisClient.poolsize
    reason = "Redis at 127.0.0.1:6379 refused AUTH: WRONGPASS invalid username-password pair or user is disabled."
    assert str(failure_of(wire.client.call("PING")).value) == reason  # no wait for the deadline
    for delay in (0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0):  # exponential, capped at max_retry
        wire.reactor.advance(delay - 0.01)
        assert wire.new_attempts() == []
        wire.reactor.advance(0.01)
        assert wire.wrong_password_all() == RedisClient.poolsize
    assert str(failure_of(wire.client.call("PING")).value) == reason
    # The password fixed on the Redis side: the next attempts pass, and calls go through.
    wire.reactor.advance(3.0)
    protocol, transport = wire.up(wire.new_attempts()[0])
    assert wire.client.reason is None
    got = wire.client.call("PING")
    assert transport.value() == resp("PING")
    protocol.dataReceived(b"+PONG\r\n")
    assert _sync.successResultOf(got) == "PONG"


def test_a_refused_connection_is_the_reason_at_the_deadline_and_is_tried_again() -> None:
    wire = Wire()
    wire.client.startService()
    wire.refuse_all()
    d = wire.client.call("PING")
    assert not d.called  # Redis may be restarting: the call waits for it, up to its deadline
    wire.reactor.advance(0.2)
    assert len(wire.new_attempts()) == RedisClient.poolsize
    wire.reactor.advance(2.8)
    assert str(failure_of(d).value) == "cannot connect to Redis at 127.0.0.1:6379: connection refused"


def test_a_call_waiting_through_a_restart_is_answered() -> None:
    wire = Wire()
    wire.client.startService()
    wire.refuse_all()
    d = wire.client.call("PING")
    wire.reactor.advance(0.2)
    protocol, transport = wire.up(wire.new_attempts()[0])
    assert transport.value() == resp("PING")
    protocol.dataReceived(b"+PONG\r\n")
    assert _sync.successResultOf(d) == "PONG"


def test_a_refused_select_is_the_reason() -> None:
    wire = Wire(password="", db=7)
    wire.client.startService()
    for factory in wire.new_attempts():
        protocol, transport = wire.accept(factory)
        protocol.dataReceived(b"-ERR DB index is out of range\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
    failure = failure_of(wire.client.call("PING"))
    assert str(failure.value) == "Redis at 127.0.0.1:6379 refused SELECT 7: ERR DB index is out of range"


# --- deadlines -----------------------------------------------------------------------------------


def test_a_call_waits_for_a_connection_being_opened_until_its_deadline() -> None:
    wire = Wire()
    wire.client.startService()
    factories = wire.new_attempts()
    waiting = wire.client.call("PING")
    assert not waiting.called  # attempts under way: wait for one
    protocol, transport = wire.up(factories[0])
    assert transport.value() == resp("PING")
    protocol.dataReceived(b"+PONG\r\n")
    assert _sync.successResultOf(waiting) == "PONG"

    stalled = Wire()
    stalled.client.startService()  # attempts that never end (no SYN-ACK)
    d = stalled.client.call("PING")
    stalled.reactor.advance(2.9)
    assert not d.called
    stalled.reactor.advance(0.1)
    assert str(failure_of(d).value) == "no connection to Redis at 127.0.0.1:6379 within 3s"


def test_waiting_calls_fail_at_once_when_redis_refuses_the_password() -> None:
    wire = Wire()
    wire.client.startService()
    d = wire.client.call("PING")
    assert not d.called
    wire.wrong_password_all()
    assert "refused AUTH: WRONGPASS" in str(failure_of(d).value)


def test_an_unanswered_command_fails_at_its_deadline_and_its_connection_is_replaced() -> None:
    wire = Wire()
    wire.client.startService()
    factories = wire.new_attempts()
    protocol, transport = wire.up(factories[0])
    wire.reactor.advance(10)
    d = wire.client.call("EVALSHA", "abc", 0)
    wire.reactor.advance(3)
    assert str(failure_of(d).value) == "Redis at 127.0.0.1:6379 did not answer EVALSHA within 3s"
    assert transport.disconnecting  # its replies would come in the wrong order now
    protocol.connectionLost(Failure(ConnectionDone()))
    assert len(wire.new_attempts()) == 1  # it had been up a while: at once


def test_a_connection_lost_in_flight_fails_its_calls_and_later_ones_wait_for_the_next() -> None:
    wire = Wire()
    wire.client.startService()
    protocol, transport = wire.up(wire.new_attempts()[0])
    wire.reactor.advance(10)
    d = wire.client.call("PING")
    protocol.connectionLost(Failure(ConnectionDone()))
    assert str(failure_of(d).value) == "lost the connection to Redis at 127.0.0.1:6379 during PING"
    reconnecting = wire.new_attempts()
    assert len(reconnecting) == 1  # at once
    waiting = wire.client.call("PING")  # for the new connection
    protocol, transport = wire.up(reconnecting[0])
    protocol.dataReceived(b"+PONG\r\n")
    assert _sync.successResultOf(waiting) == "PONG"
    protocol.connectionLost(Failure(ConnectionDone()))  # lost again, at once: backoff
    assert wire.new_attempts() == []
    gone = wire.client.call("PING")
    wire.reactor.advance(3)
    assert str(failure_of(gone).value) == "lost the connection to Redis at 127.0.0.1:6379"


def test_commands_go_to_one_connection_and_a_timed_out_one_hands_over_to_a_standby() -> None:
    wire = Wire()
    wire.client.startService()
    factories = wire.new_attempts()
    first, first_wire = wire.up(factories[0])
    second, second_wire = wire.up(factories[1])
    wire.reactor.advance(10)
    calls = [wire.client.call("PING") for _ in range(3)]
    assert first_wire.value() == resp("PING") * 3 and second_wire.value() == b""  # pipelined, in order
    wire.reactor.advance(3)
    assert all("did not answer PING within 3s" in str(failure_of(d).value) for d in calls)
    assert first_wire.disconnecting and not second_wire.disconnecting
    got = wire.client.call("PING")  # at once on the standby, before the first's connectionLost
    assert second_wire.value() == resp("PING")
    second.dataReceived(b"+PONG\r\n")
    assert _sync.successResultOf(got) == "PONG"
    first.connectionLost(Failure(ConnectionDone()))
    assert len(wire.new_attempts()) == 1  # closed here: opened again at once
    assert not second_wire.disconnecting


def test_a_connection_closed_by_redis_takes_the_idle_standbys_with_it() -> None:
    """A restart or a kill closes every connection; their EOFs arrive one by one. A command sent on a
    standby in between would fail later, after calls that came after it had been answered."""
    wire = Wire()
    wire.client.startService()
    factories = wire.new_attempts()
    first, first_wire = wire.up(factories[0])
    second, second_wire = wire.up(factories[1])
    wire.reactor.advance(10)
    first.connectionLost(Failure(ConnectionDone()))
    assert second_wire.disconnecting  # idle: dropped at once
    d = wire.client.call("PING")
    assert second_wire.value() == b""  # not sent on it: it waits for a new connection
    second.connectionLost(Failure(ConnectionDone()))
    assert len(wire.new_attempts()) == 2  # both opened again
    wire.reactor.advance(3)
    assert str(failure_of(d).value) == "lost the connection to Redis at 127.0.0.1:6379"


# --- replies, scripts, stop ----------------------------------------------------------------------


def test_error_replies_and_the_noscript_fallback() -> None:
    wire = Wire()
    wire.client.startService()
    protocol, transport = wire.up(wire.new_attempts()[0])
    wrong = wire.client.call("INCR", "k")
    protocol.dataReceived(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
    assert "WRONGTYPE" in str(_sync.failureResultOf(wrong, RedisError).value)
    transport.clear()
    script = Script("queue_counts")
    result = wire.client.run(script, ["a"], [1])
    assert transport.value() == resp("EVALSHA", script.sha, "1", "a", "1")
    transport.clear()
    protocol.dataReceived(b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
    assert transport.value() == resp("EVAL", script.text, "1", "a", "1")
    protocol.dataReceived(b":5\r\n")
    assert _sync.successResultOf(result) == 5


def test_stop_closes_connections_cancels_retries_and_refuses_calls() -> None:
    wire = Wire()
    wire.client.startService()
    factories = wire.new_attempts()
    protocol, transport = wire.up(factories[0])
    for factory in factories[1:]:
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    wire.reactor.advance(0.3)
    assert wire.reactor.getDelayedCalls()  # the failed slots' retries
    stopped = wire.client.stopService()
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    _sync.successResultOf(stopped)
    assert [c for c in wire.reactor.getDelayedCalls() if c.active()] == []
    assert "closed" in str(failure_of(wire.client.call("PING")).value)
    wire.reactor.advance(60)
    assert wire.new_attempts() == []


# --- a real redis-server --------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.close()


def admin(server: RedisServer, password: str | None = None) -> redis_py.Redis:
    return redis_py.Redis(host="127.0.0.1", port=server.port, password=password, socket_timeout=5)


async def sleep(seconds: float) -> None:
    await task.deferLater(global_reactor, seconds, lambda: None)


async def answer_within(client: RedisClient, seconds: float) -> tuple[float, list[str]]:
    """Call PING until it answers (seconds taken, the errors seen on the way), or fail after *seconds*."""
    started, errors = time.monotonic(), []
    while True:
        try:
            await client.call("PING")
            return time.monotonic() - started, errors
        except RedisUnavailable as e:
            errors.append(str(e))
        assert time.monotonic() - started < seconds, errors[-3:]
        await sleep(0.1)


@pytest_twisted.ensureDeferred
async def test_real_redis_password_fixed_on_the_redis_side_then_a_restart(own_redis: RedisServer) -> None:
    admin(own_redis).config_set("requirepass", "not-the-daemons")
    client = RedisClient(own_redis.addr, "the-daemons", 0, global_reactor, timeout=3.0)
    client.startService()
    try:
        await sleep(0.3)
        started = time.monotonic()
        with pytest.raises(RedisUnavailable) as refused:
            await client.call("PING")
        assert time.monotonic() - started < 0.5  # the reason at once, not after the deadline
        assert str(refused.value) == (f"Redis at {own_redis.addr} refused AUTH: WRONGPASS invalid "
                                      "username-password pair or user is disabled.")
        admin(own_redis, "not-the-daemons").config_set("requirepass", "the-daemons")
        took, _ = await answer_within(client, 5.0)  # at most max_retry (3 s) away
        await client.call("SET", "k", b"\xff\x00")
        assert await client.call("GET", "k") == b"\xff\x00"
        # Restarted (the password set again from outside, as a config file would): back by itself.
        own_redis.stop()
        with pytest.raises(RedisUnavailable) as down:
            await client.call("PING")
        assert "lost the connection" in str(down.value) or "connection refused" in str(down.value), down.value
        await sleep(1.0)
        with pytest.raises(RedisUnavailable) as down:
            await client.call("PING")
        assert str(down.value) == f"cannot connect to Redis at {own_redis.addr}: connection refused"
        own_redis.start()
        admin(own_redis).config_set("requirepass", "the-daemons")
        await answer_within(client, 5.0)
        assert await client.call("GET", "k") is None  # a new, empty Redis
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_real_redis_stopped_process_each_call_ends_at_its_deadline(own_redis: RedisServer) -> None:
    client = RedisClient(own_redis.addr, "", 0, global_reactor, timeout=0.5)
    client.startService()
    try:
        await answer_within(client, 5.0)
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(RedisUnavailable) as slow:
                    await client.call("PING")
                assert time.monotonic() - started < 1.5
                assert "within 0.5s" in str(slow.value), slow.value
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        await answer_within(client, 5.0)
    finally:
        await client.stopService()
