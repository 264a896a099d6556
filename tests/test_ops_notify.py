"""Readiness and the watchdog (cachesvc/observe/sdnotify.py) against a real ``NOTIFY_SOCKET``.

The test binds the datagram socket systemd would (a path, and an abstract ``@`` name), starts
``twistd`` with ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` in its environment, and reads what arrives:
``READY=1`` with ``STATUS=`` once the purge port accepts, ``WATCHDOG=1`` at half the interval,
``RELOADING=1``/``READY=1`` around a SIGHUP, ``STOPPING=1`` at SIGTERM. In-process, with a
``Clock``: the pings come from the reactor's clock, and nothing is opened without ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from cachesvc.observe.sdnotify import Notifier, Readiness, clean_status, watchdog_interval
from harness.daemon import Daemon, free_port, purge


class Listener:
    """The manager's end: a bound AF_UNIX datagram socket, read message by message."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[dict[str, str]] = []
        self.arrived: list[float] = []

    def next(self, timeout: float = 20.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in data.split("\n"))
        self.messages.append(message)
        self.arrived.append(time.monotonic())
        return message

    def until(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    sock = Listener(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


def daemon_with(tmp_path: Path, cache_root: Path, env: dict[str, str], conf: bool = False) -> tuple[Daemon, int]:
    port = free_port()
    args = ["--cache-root", str(cache_root), "--purge-listen", f"tcp:{port}:interface=127.0.0.1"]
    if conf:
        path = tmp_path / "c.yaml"
        path.write_text(f"purge:\n  listen: tcp:{port}:interface=127.0.0.1\n  roots: [{cache_root}]\n")
        args = ["--config", str(path)]
    return Daemon(args, tmp_path, env=env), port


# --- end to end ----------------------------------------------------------------------------------


def test_ready_status_watchdog_and_stopping(tmp_path: Path, cache_root: Path, listener: Listener) -> None:
    daemon, port = daemon_with(tmp_path, cache_root, {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "400000"})
    try:
        ready = listener.until("READY")
        # READY=1 means listening: the first connection after it is answered.
        assert purge(port, f"{cache_root}/x\n".encode()) == b"Purge: Success\n"
        assert ready["READY"] == "1" and ready["MAINPID"] == str(daemon.proc.pid)
        assert ready["STATUS"] == f"purge on tcp:{port}:interface=127.0.0.1 (1 root)"
        start = time.monotonic()
        pings = 0
        while time.monotonic() - start < 1.5:
            if listener.next(2.0).get("WATCHDOG") == "1":
                pings += 1
        assert 4 <= pings <= 12, pings  # every 0.2 s (half of 0.4 s): about 7
        daemon.proc.send_signal(signal.SIGTERM)
        stopping = listener.until("STOPPING")
        assert stopping == {"STOPPING": "1", "STATUS": "stopping"}
        daemon.exit_code()
    finally:
        daemon.stop()


def test_abstract_socket_and_reload(tmp_path: Path, cache_root: Path) -> None:
    listener = Listener(f"@cachesvc-test-{uuid.uuid4().hex}")
    daemon, _ = daemon_with(tmp_path, cache_root, {"NOTIFY_SOCKET": listener.address}, conf=True)
    try:
        assert listener.until("READY")["READY"] == "1"
        daemon.proc.send_signal(signal.SIGHUP)
        reloading = listener.next()
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        again = listener.next()
        assert again["READY"] == "1" and again["STATUS"].startswith("purge on tcp:")
        daemon.wait_for_log("SIGHUP: re-read")
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
        listener.close()
    assert not any("WATCHDOG" in m for m in listener.messages)  # no WATCHDOG_USEC, no pings


def test_watchdog_meant_for_another_process(tmp_path: Path, cache_root: Path, listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    daemon, _ = daemon_with(tmp_path, cache_root, env)
    try:
        listener.until("READY")
        with pytest.raises(TimeoutError):
            listener.next(0.6)
    finally:
        daemon.stop()


def test_a_missing_notify_socket_is_logged_once_and_harmless(tmp_path: Path, cache_root: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens"), "WATCHDOG_USEC": "200000"}
    daemon, port = daemon_with(tmp_path, cache_root, env)
    try:
        daemon.wait_for_port(port)
        time.sleep(0.5)
        assert purge(port, f"{cache_root}/x\n".encode()) == b"Purge: Success\n"
    finally:
        daemon.stop()
    assert daemon.log.count("cannot notify systemd") == 1


# --- in-process ----------------------------------------------------------------------------------


def test_no_notify_socket_opens_nothing() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled and notifier.notify("READY=1") is False and notifier._socket is None
    service = Readiness(notifier, Clock(), "x", watchdog=1.0)
    service.startService()
    service.stopService()
    assert notifier._socket is None


def test_pings_come_from_the_reactor_clock(listener: Listener) -> None:
    clock = Clock()
    clock.callWhenRunning = lambda f, *a: f(*a)  # type: ignore[attr-defined]  # the reactor runs already
    service = Readiness(Notifier(listener.address), clock, "purge on\ntcp:1", watchdog=5.0)
    service.startService()
    assert listener.next(1)["STATUS"] == "purge on tcp:1"  # one line
    assert listener.next(1) == {"WATCHDOG": "1"}  # at once, then every 5 s of the clock
    listener.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.sock.recv(100)
    clock.advance(5)
    listener.sock.setblocking(True)
    assert listener.next(1) == {"WATCHDOG": "1"}
    service.stopService()
    assert listener.next(1)["STOPPING"] == "1"
    clock.advance(20)
    listener.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.sock.recv(100)


@pytest.mark.parametrize(
    "env, interval",
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert watchdog_interval(env) == interval


def test_status_is_one_line() -> None:
    assert clean_status("a\nb\r\n  c") == "a b c"
