"""The API against hostile clients and a Redis in trouble, end to end (issue 9).

``twistd ... cachesvc --config`` in a subprocess, a real redis-server, raw sockets: unauthenticated
bodies refused from the headers (nothing ever in the daemon's temporary directory), slow clients
closed by ``request_timeout``, ``http_api.max_connections``, a listen backlog of 1,024 and the open
files limit raised as the purge half has them, 400 where the client is wrong, 503 with the reason
when Redis is out of memory.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py

import harness.daemon
from harness.daemon import Daemon, free_port, purge, wait_until
from harness.redis_server import RedisServer

KEY = "test-internal-auth-key"
UNAUTHORIZED = b'{"success":false,"message":"unauthorized"}'
MAX_BODY = 2_000_000


def write_configs(base: Path, redis_addr: str, port: int, api: str = "") -> Path:
    (base / "hosts.yaml").write_text(
        "hosts:\n  - id: 1\n    domain: test.example.com\n"
        "    dimensions:\n      desktop: {id: 1, width: 1920, height: 1080, render_ua: desktop}\n")
    (base / "edge-gateway.yaml").write_text(f'internal: {{auth_key: "{KEY}"}}\nhosts: {{include: hosts.yaml}}\n')
    conf = base / "cache-daemon.yaml"
    conf.write_text(
        f'eg_config: edge-gateway.yaml\ndaemon_id: hardening\nredis: {{addr: "{redis_addr}"}}\n'
        "http_api:\n  enabled: true\n"
        f'  listen: "127.0.0.1:{port}"\n  request_timeout: 2s\n  max_body_size: {MAX_BODY}\n{api}')
    return conf


class Running:
    def __init__(self, base: Path, redis_addr: str, api: str = "", env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.daemon = Daemon(["--config", str(write_configs(base, redis_addr, self.port, api))], base, env=env)
        self.daemon.wait_for_port(self.port)

    def call(self, method: str, path: str, body: bytes | None = None,
             keys: tuple[str, ...] = (KEY,)) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.putrequest(method, path)
            for key in keys:
                conn.putheader("X-Internal-Auth", key)
            conn.putheader("Content-Length", str(len(body or b"")))
            conn.endheaders(body)
            response = conn.getresponse()
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
        finally:
            conn.close()

    def temp_files(self, tmp: Path) -> list[str]:
        """The daemon's open files in *tmp* (an anonymous O_TMPFILE shows as ``tmp/#inode (deleted)``)."""
        found = []
        fds = Path(f"/proc/{self.daemon.proc.pid}/fd")
        for fd in fds.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(tmp)):
                found.append(target)
        return found


@pytest.fixture
def running(tmp_path: Path, redis_server: Any) -> Iterator[Running]:
    server = Running(tmp_path, redis_server.addr)
    try:
        yield server
    finally:
        server.daemon.stop()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def answer(s: socket.socket, within: float) -> tuple[bytes, bool]:
    """What arrives within *within* seconds, and whether the server closed the connection by then."""
    deadline = time.monotonic() + within
    got = b""
    while time.monotonic() < deadline:
        readable, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            break
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return got, True
        if not chunk:
            return got, True
        got += chunk
    return got, False


def head(path: str, *lines: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: cd.test\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()


# --- request bodies: the key first, never a temporary file -----------------------------------------


def test_unauthenticated_bodies_are_refused_from_the_headers_and_never_reach_the_temp_dir(
        tmp_path: Path, redis_server: Any) -> None:
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    server = Running(tmp_path, redis_server.addr, env={"TMPDIR": str(tmp)})
    try:
        # 50 clients announce 1.5 MB bodies (under max_body_size) without a key, and wait: the 401
        # comes from the headers alone, then the connection closes; not one body byte was needed.
        clients = [connect(server.port) for _ in range(50)]
        for i, s in enumerate(clients):
            s.sendall(head("/internal/cache/recache", "Content-Length: 1500000",
                           *(["X-Internal-Auth: wrong"] if i % 2 else [])))
        for s in clients:
            got, closed = answer(s, 3.0)
            assert got.startswith(b"HTTP/1.1 401 Unauthorized\r\n") and got.endswith(b"\r\n\r\n" + UNAUTHORIZED)
            assert closed
            s.close()
        # 50 clients that send their bodies regardless: refused the same way, nothing kept.
        clients = [connect(server.port) for _ in range(50)]
        for s in clients:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(head("/internal/cache/invalidate", "Content-Length: 1500000") + b"x" * 600_000)
        time.sleep(0.5)
        assert server.temp_files(tmp) == []
        for s in clients:
            s.close()
        # An authorised large body is read into memory, not into a temporary file.
        large = b'{"host_id":1,"urls":["' + b"a" * (1_500_000 - 25) + b'"]}'
        s = connect(server.port)
        s.sendall(head("/internal/cache/recache", f"X-Internal-Auth: {KEY}", f"Content-Length: {len(large)}")
                  + large[:700_000])
        time.sleep(0.5)
        assert server.temp_files(tmp) == []
        s.sendall(large[700_000:])
        got, _ = answer(s, 5.0)
        assert got.startswith(b"HTTP/1.1 400 ") and b"priority must be 'high' or 'normal'" in got
        s.close()
        assert list(tmp.iterdir()) == []
        assert server.call("GET", "/status")[0] == 200
    finally:
        server.daemon.stop()
    assert "Traceback" not in server.daemon.log


# --- request_timeout covers the whole request --------------------------------------------------------


def drip(port: int, first: bytes, rest: bytes, every: float, limit: float) -> tuple[bytes, float | None]:
    """Send *first*, then *rest* a byte each *every* seconds; what came back and when the connection
    was closed (``None``: still open after *limit* seconds)."""
    with connect(port) as s:
        started = time.monotonic()
        if first:
            s.sendall(first)
        got, sent = b"", 0
        while time.monotonic() - started < limit:
            readable, _, _ = select.select([s], [], [], every)
            try:
                if readable:
                    chunk = s.recv(65536)
                    if not chunk:
                        return got, time.monotonic() - started
                    got += chunk
                elif sent < len(rest):
                    s.send(rest[sent : sent + 1])
                    sent += 1
            except (BrokenPipeError, ConnectionResetError):
                return got, time.monotonic() - started
        return got, None


def test_slow_clients_are_closed_by_request_timeout(running: Running) -> None:
    # request_timeout is 2s; each byte used to restart a 60 s idle timer, so these stayed open.
    results: dict[str, tuple[bytes, float | None]] = {}
    request = f"GET /status HTTP/1.1\r\nHost: cd.test\r\nX-Internal-Auth: {KEY}\r\n\r\n".encode()
    body_head = head("/internal/cache/recache", f"X-Internal-Auth: {KEY}", "Content-Length: 200")
    cases = {
        "headers": (request[:3], request[3:], 0.2),
        "body": (body_head, b"x" * 200, 0.2),
        "silent": (b"", b"", 0.2),
    }
    threads = [threading.Thread(target=lambda n=name, c=case: results.__setitem__(n, drip(running.port, *c, limit=8)))
               for name, case in cases.items()]
    for t in threads:
        t.start()
    started = time.monotonic()
    healthz = []
    while any(t.is_alive() for t in threads):  # another client is served meanwhile
        t0 = time.monotonic()
        healthz.append((running.call("GET", "/healthz", keys=())[0], time.monotonic() - t0))
        time.sleep(0.2)
        assert time.monotonic() - started < 15
    for t in threads:
        t.join()
    for name in ("headers", "body"):
        got, closed = results[name]
        assert got.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), (name, got)
        assert got.endswith(b'{"success":false,"message":"request not received within request_timeout (2s)"}')
        assert closed is not None and 1.8 < closed < 3.5, (name, closed)
    got, closed = results["silent"]
    assert got == b"" and closed is not None and 1.8 < closed < 3.5
    assert healthz and all(code == 200 and took < 0.5 for code, took in healthz)


# --- http_api.max_connections -------------------------------------------------------------------------


def test_max_connections_refuses_new_connections_at_once(tmp_path: Path, redis_server: Any) -> None:
    server = Running(tmp_path, redis_server.addr, api="  max_connections: 5\n  request_timeout: 10s\n")
    held = []
    try:
        time.sleep(0.3)  # wait_for_port's probe connection is gone
        held = [connect(server.port) for _ in range(5)]
        for s in held:  # each one served, and kept alive
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            got, closed = answer(s, 0.5)
            assert got.endswith(b'{"success":true}') and not closed
        started = time.monotonic()
        with connect(server.port) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            got, closed = answer(extra, 3.0)
        assert (got, closed) == (b"", True) and time.monotonic() - started < 1.0  # closed, not left hanging
        held.pop().close()

        def served() -> bool:
            try:
                return server.call("GET", "/healthz", keys=())[0] == 200
            except OSError:  # refused: the close is not seen yet
                return False

        wait_until(served, timeout=5, what="a free place served")
        server.daemon.wait_for_log("refusing API connections: 5 open, http_api.max_connections is 5")
    finally:
        for s in held:
            s.close()
        server.daemon.stop()


def test_max_connections_must_be_positive(tmp_path: Path, redis_server: Any) -> None:
    port = free_port()
    conf = write_configs(tmp_path, redis_server.addr, port, api="  max_connections: 0\n")
    daemon = Daemon(["--config", str(conf)], tmp_path)
    assert daemon.exit_code() == 78  # EX_CONFIG (issue 13)
    daemon.stop()
    assert "http_api.max_connections must be > 0, got 0" in daemon.log


def test_the_api_port_listens_with_a_backlog_of_1024(running: Running) -> None:
    listing = subprocess.run(["ss", "-ltnH", f"sport = :{running.port}"], capture_output=True, text=True, check=True)
    backlog = int(listing.stdout.split()[2])  # State Recv-Q Send-Q: Send-Q is the listen backlog
    with open("/proc/sys/net/core/somaxconn") as f:
        assert backlog == min(1024, int(f.read()))


@pytest.mark.parametrize("halves", ["recache", "recache+purge"])
def test_the_soft_open_files_limit_is_raised_once_whichever_halves_run(
        tmp_path: Path, redis_server: Any, monkeypatch: pytest.MonkeyPatch, halves: str) -> None:
    purge_port = free_port()
    section = ""
    if halves == "recache+purge":
        (tmp_path / "cache").mkdir()
        section = f"purge:\n  listen: tcp:{purge_port}:interface=127.0.0.1\n  roots: [{tmp_path / 'cache'}]\n"
    monkeypatch.setattr(harness.daemon, "TWISTD", ["prlimit", "--nofile=200:2048", "--", *harness.daemon.TWISTD])
    server = Running(tmp_path, redis_server.addr, api=section)
    try:
        server.daemon.wait_for_log("raised the open files limit from 200 to 2048")
        limits = Path(f"/proc/{server.daemon.proc.pid}/limits").read_text()  # prlimit execs twistd: the same pid
        (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert line.split()[3:5] == ["2048", "2048"]  # soft, hard
        assert server.call("GET", "/healthz", keys=())[0] == 200
        if section:
            assert purge(purge_port, f"{tmp_path / 'cache'}/a.example\n".encode()) == b"Purge: Success\n"
    finally:
        server.daemon.stop()
    assert server.daemon.log.count("open files limit") == 1  # raised once for the process, logged once


# --- the client at fault: 400, never a 500 with a traceback -----------------------------------------------


def test_client_faults_are_400(running: Running, redis: Any) -> None:
    for opening, closing, char in ((b"[", b"]", "["), (b'{"a":', b"}", "{")):
        body = opening * 100_000 + b"1" + closing * 100_000
        assert running.call("POST", "/internal/cache/recache", body) == (400, {
            "success": False, "message": f"invalid json: invalid character '{char}' exceeded max depth"})
    for cursor in ("abc", "18446744073709551616", "-1", "1_0"):
        assert running.call("GET", f"/internal/cache/urls?host_id=1&cursor={cursor}") == (
            400, {"success": False, "message": f"invalid cursor: {cursor}"})
    assert running.call("GET", "/internal/cache/urls?host_id=1&cursor=18446744073709551615")[0] == 200
    for host_id in ("1_0", "%D9%A1", "%201", "99999999999999999999"):
        assert running.call("GET", f"/internal/cache/queue?host_id={host_id}") == (
            400, {"success": False, "message": "host_id must be a valid integer"})
    assert running.call("GET", "/internal/cache/urls?host_id=1&limit=1_0") == (
        400, {"success": False, "message": "limit must be a valid integer"})
    # X-Internal-Auth twice: the first counts, as Go's Header.Get.
    assert running.call("GET", "/internal/cache/queue/summary?host_id=1", keys=(KEY, "wrong"))[0] == 200
    assert running.call("GET", "/internal/cache/queue/summary?host_id=1", keys=("wrong", KEY)) == (
        401, {"success": False, "message": "unauthorized"})
    assert "Traceback" not in running.daemon.log


# --- Redis at fault -------------------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


def test_redis_out_of_memory_is_503_with_the_reason(tmp_path: Path, own_redis: RedisServer) -> None:
    r = redis_py.Redis(host="127.0.0.1", port=own_redis.port)
    server = Running(tmp_path, own_redis.addr)
    body = json.dumps({"host_id": 1, "urls": ["https://test.example.com/a"], "dimension_ids": [1],
                       "priority": "high"}).encode()
    try:
        r.config_set("maxmemory-policy", "noeviction")
        r.mset({f"fill:{i}": "x" * 1000 for i in range(2000)})  # about 2 MB
        r.config_set("maxmemory", "1mb")  # below what is used: every write is refused
        message = "redis out of memory: OOM command not allowed when used memory > 'maxmemory'."
        assert server.call("POST", "/internal/cache/recache", body) == (503, {"success": False, "message": message})
        assert server.call("GET", "/healthz", keys=())[0] == 200  # Redis answers; it is only full
        r.config_set("maxmemory", "0")
        assert server.call("POST", "/internal/cache/recache", body)[0] == 200
        assert r.zcard("recache:1:high") == 1
    finally:
        server.daemon.stop()
        r.close()
    assert "Traceback" not in server.daemon.log


def test_a_503_while_redis_is_slow_is_safe_to_repeat(tmp_path: Path, own_redis: RedisServer) -> None:
    """Not a fix: what the README says. A 503 says the daemon stopped waiting, not that nothing was
    written: Redis may run the call after the answer (here one script call: all of it or none), and
    repeating the request gives the same entries, never doubled."""
    r = redis_py.Redis(host="127.0.0.1", port=own_redis.port)
    server = Running(tmp_path, own_redis.addr)
    urls = [f"https://test.example.com/p{i}" for i in range(300)]
    body = json.dumps({"host_id": 1, "urls": urls, "dimension_ids": [1], "priority": "high"}).encode()
    busy = ("local s = redis.call('TIME') "
            "repeat local n = redis.call('TIME') until (n[1] - s[1]) * 1e6 + n[2] - s[2] > 3e6")
    try:
        assert server.call("GET", "/status")[0] == 200
        blocker = threading.Thread(target=lambda: redis_py.Redis(host="127.0.0.1", port=own_redis.port).eval(busy, 0))
        blocker.start()
        time.sleep(0.3)
        status, answer_ = server.call("POST", "/internal/cache/recache", body)
        assert status == 503 and answer_["message"].startswith("redis unavailable: ")
        blocker.join()
        time.sleep(0.5)
        assert r.zcard("recache:1:high") in (0, 300)
        status, answer_ = server.call("POST", "/internal/cache/recache", body)  # the client's retry
        assert status == 200 and answer_["data"]["entries_enqueued"] == 300
        assert r.zcard("recache:1:high") == 300  # the same members: nothing doubled
    finally:
        server.daemon.stop()
        r.close()
