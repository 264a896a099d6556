"""Socket activation: the purge port passed by ``systemd-socket-activate`` (Debian's systemd package).

``systemd-socket-activate`` binds the port, waits for the first connection, then execs ``twistd``
with ``LISTEN_FDS`` and ``LISTEN_PID`` (and ``LISTEN_FDNAMES`` only with ``--fdname``). The first
client's purge, sent before the daemon even started, must be answered through the passed socket,
with and without a name. A ``systemd:`` endpoint with no socket passed, or naming one that was not,
is a configuration error: one line, exit status 78, no traceback.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from cachesvc.observe.sdlisten import name_unnamed_sockets
from harness.daemon import TWISTD, Daemon, free_port

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate (Debian's systemd) missing")


def config(tmp_path: Path, cache_root: Path, listen: str) -> Path:
    conf = tmp_path / "cachesvc.yaml"
    conf.write_text(f'purge:\n  listen: "{listen}"\n  roots: [{cache_root}]\n')
    return conf


def activated(tmp_path: Path, conf: Path, port: int, fdname: str | None) -> subprocess.Popen[bytes]:
    assert ACTIVATE is not None
    argv = [ACTIVATE, "-l", f"127.0.0.1:{port}", *([f"--fdname={fdname}"] if fdname else []),
            *TWISTD, "-n", "--pidfile=", "--logfile=-", "cachesvc", "--config", str(conf)]
    log = open(tmp_path / "activated.log", "wb")  # noqa: SIM115 -- closed with the process below
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def connect_when_bound(port: int) -> socket.socket:
    """Connect as soon as systemd-socket-activate has bound the port (this connection starts the daemon)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=20)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def first_purge(port: int, line: bytes) -> bytes:
    with connect_when_bound(port) as sock:
        sock.sendall(line)
        return sock.recv(512)


@needs_activate
@pytest.mark.parametrize(
    "fdname, listen",
    [
        (None, "systemd:domain=INET:index=0"),  # no LISTEN_FDNAMES: the IndexError of old
        ("purge", "systemd:domain=INET:name=purge"),  # as cachesvc.socket passes it
        ("purge", "systemd:domain=INET:index=0"),
    ],
    ids=["unnamed-index", "named", "named-index"],
)
def test_purge_through_the_activated_socket(tmp_path: Path, cache_root: Path, fdname: str | None, listen: str) -> None:
    zone = cache_root / "example.com" / "1" / "ab"
    zone.mkdir(parents=True)
    (zone / "entry").write_text("cached")
    port = free_port()
    proc = activated(tmp_path, config(tmp_path, cache_root, listen), port, fdname)
    try:
        assert first_purge(port, f"{cache_root}/example.com\n".encode()) == b"Purge: Success\n"
        assert not (zone / "entry").exists()
        assert first_purge(port, f"{cache_root}/example.com\n".encode()) == b"Purge: Success\n"
    finally:
        proc.terminate()
        proc.wait(20)
    log = (tmp_path / "activated.log").read_text()
    assert "Traceback" not in log and f"purge '{cache_root}/example.com' deleted" in log


@pytest.mark.parametrize(
    "listen, message",
    [
        ("systemd:domain=INET:index=0", "listens on a socket passed by systemd, and none was passed"),
        ("systemd:domain=INET:name=purge", "none was passed (LISTEN_FDS is not set"),
    ],
)
def test_no_socket_passed_is_a_config_error(tmp_path: Path, cache_root: Path, listen: str, message: str) -> None:
    daemon = Daemon(["--config", str(config(tmp_path, cache_root, listen))], tmp_path)
    code = daemon.exit_code()
    daemon.stop()
    assert code == 78, daemon.log
    assert message in daemon.log and "systemctl start cachesvc.socket" in daemon.log
    assert "Traceback" not in daemon.log and "Usage" not in daemon.log
    assert len(daemon.log.strip().splitlines()) == 1


@needs_activate
@pytest.mark.parametrize(
    "fdname, listen, message",
    [
        ("other", "systemd:domain=INET:name=purge", "no socket named 'purge' was passed (passed: other)"),
        (None, "systemd:domain=INET:name=purge", "no socket named 'purge' was passed (passed: unknown)"),
        (None, "systemd:domain=INET:index=1", "systemd passed 1 socket(s), so index= is 0 to 0; got '1'"),
    ],
)
def test_a_socket_that_was_not_passed(tmp_path: Path, cache_root: Path, fdname: str | None, listen: str,
                                      message: str) -> None:
    port = free_port()
    proc = activated(tmp_path, config(tmp_path, cache_root, listen), port, fdname)
    try:
        connect_when_bound(port).close()
        assert proc.wait(30) == 78
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    log = (tmp_path / "activated.log").read_text()
    assert message in log and "Traceback" not in log, log


# --- in-process ----------------------------------------------------------------------------------


def test_unnamed_sockets_are_named_as_libsystemd_does() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}
    assert name_unnamed_sockets(env) and env["LISTEN_FDNAMES"] == "unknown:unknown"
    named = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "purge"}
    assert not name_unnamed_sockets(named) and named["LISTEN_FDNAMES"] == "purge"
    other = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert not name_unnamed_sockets(other) and "LISTEN_FDNAMES" not in other
    assert not name_unnamed_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"})
