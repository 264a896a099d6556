"""Issue 9, the purge service end to end: ``twistd ... cachesvc`` under floods, slow clients and caps.

Every test starts its own daemon as a user would (``harness.daemon.Daemon``), attacks it over real
sockets, and measures what a second, ordinary client sees. Bounds are generous (250 ms where the
benchmark's target is 50 ms, ``bench/flood_bench.py``): the tests prove the daemon is not frozen,
the benchmark measures how well it does.
"""

from __future__ import annotations

import http.client
import os
import pwd
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import harness.daemon
from harness.daemon import Daemon, free_port, purge, wait_until
from harness.nginxfiles import HEADER, write_entry
from tests.test_api_e2e import write_configs

OK = b"Purge: Success\n"
ERR = b"Purge: Error\n"
BOUND = 0.250  # seconds: a frozen daemon takes seconds; a sliced one answers in milliseconds

FLOODER = r"""
import socket, sys, time
port, seconds, rate = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
end = time.monotonic() + seconds
next_at = time.monotonic()
sent = connections = 0
while time.monotonic() < end:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        time.sleep(0.05)
        continue
    connections += 1
    s.setblocking(False)
    alive = True
    while alive and time.monotonic() < end:
        time.sleep(max(0.0, next_at - time.monotonic()))
        try:
            s.sendall(b"\n" * rate)  # 64 KiB of newlines a second, as `head -c 65536 /dev/zero | tr` sends
            sent += rate
        except BlockingIOError:
            pass
        except OSError:
            alive = False
        next_at += 1.0
        while alive and time.monotonic() < min(next_at, end):  # read the replies, notice a close
            try:
                alive = s.recv(1 << 20) != b""
            except BlockingIOError:
                time.sleep(0.005)
            except OSError:
                alive = False
    s.close()
print(sent, connections)
"""


def start(base: Path, root: Path, extra: str = "", prefix: list[str] | None = None,
          monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[Daemon, int]:
    """A purge daemon on a free port, configured by file; *prefix* wraps twistd (e.g. prlimit)."""
    port = free_port()
    conf = base / "cachesvc.yaml"
    conf.write_text(
        f"purge:\n  listen: tcp:{port}:interface=127.0.0.1\n  roots: [{root}]\n"
        f"  zones:\n    - hosts: ['*']\n      path: {root}/{{host}}\n{extra}"
    )
    if prefix is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(harness.daemon, "TWISTD", [*prefix, *harness.daemon.TWISTD])
    daemon = Daemon(["--config", str(conf)], base)
    daemon.wait_for_port(port)
    return daemon, port


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


class Sampler(threading.Thread):
    """Every *every* seconds, *probe()* once; keeps (seconds, outcome) of each call."""

    def __init__(self, probe, every: float) -> None:
        super().__init__(daemon=True)
        self.probe, self.every = probe, every
        self.samples: list[tuple[float, object]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                outcome = self.probe()
            except OSError as e:
                outcome = repr(e)
            self.samples.append((time.perf_counter() - started, outcome))
            self.stop.wait(self.every)

    def finish(self) -> list[tuple[float, object]]:
        self.stop.set()
        self.join(30)
        return self.samples


def healthz(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def worst(samples: list[tuple[float, object]]) -> float:
    return max(seconds for seconds, _ in samples)


# --- the newline flood ---------------------------------------------------------------------------


def test_a_newline_flood_stalls_neither_other_purges_nor_the_api(tmp_path: Path, root: Path, redis_server) -> None:
    purge_port, api_port = free_port(), free_port()
    conf = write_configs(tmp_path, redis_server.addr, api_port,
                         extra=f"purge:\n  listen: tcp:{purge_port}:interface=127.0.0.1\n  roots: [{root}]\n")
    daemon = Daemon(["--config", str(conf)], tmp_path)
    try:
        daemon.wait_for_port(purge_port)
        daemon.wait_for_port(api_port)
        line = f"{root}/other.example\n".encode()
        purges = Sampler(lambda: purge(purge_port, line), 0.020)
        checks = Sampler(lambda: healthz(api_port), 0.050)
        purges.start()
        checks.start()
        flood = subprocess.run([sys.executable, "-c", FLOODER, str(purge_port), "4", "65536"],
                               capture_output=True, text=True, timeout=60)
        purged, checked = purges.finish(), checks.finish()
        sent = int(flood.stdout.split()[0])
        assert sent >= 4 * 65536, flood
        assert {outcome for _, outcome in purged} == {OK}
        assert {outcome for _, outcome in checked} == {200}
        assert len(purged) > 50 and worst(purged) < BOUND, sorted(s for s, _ in purged)[-5:]
        assert len(checked) > 20 and worst(checked) < BOUND, sorted(s for s, _ in checked)[-5:]
        log = daemon.log
        # 262,144 empty lines were sent: one log line each was 53 MB; a burst, then counts.
        assert log.count("refused: empty request") <= 100
        assert "more than 4096 lines waiting for their answer" in log
        assert len(log) < 500_000, len(log)
    finally:
        daemon.stop()


# --- slow clients and connection limits ---------------------------------------------------------


def test_slow_clients_are_closed_by_the_line_deadline(tmp_path: Path, root: Path) -> None:
    daemon, port = start(tmp_path, root, "  idle_timeout: 2s\n")
    slow: list[socket.socket] = []
    try:
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setblocking(False)
            slow.append(s)
        first_byte = time.monotonic()
        closed: dict[int, float] = {}
        ordinary: list[float] = []
        payload = f"{root}/slow.example/x".encode()
        for i in range(len(payload)):  # one byte a second: each byte used to restart the idle timer
            for n, s in enumerate(slow):
                if n in closed:
                    continue
                try:
                    s.send(payload[i : i + 1])
                    if s.recv(64) == b"":
                        closed[n] = time.monotonic()
                except BlockingIOError:
                    pass
                except OSError:
                    closed[n] = time.monotonic()
            started = time.perf_counter()
            assert purge(port, f"{root}/fast.example\n".encode()) == OK
            ordinary.append(time.perf_counter() - started)
            if len(closed) == len(slow) or time.monotonic() - first_byte > 6:
                break
            time.sleep(1.0)
        assert len(closed) == len(slow), f"{len(slow) - len(closed)} slow connections still open after 6 s"
        assert max(closed.values()) - first_byte < 2 + 1.5
        assert max(ordinary) < BOUND
        daemon.wait_for_log("a line still incomplete 2.0s after its first byte")
    finally:
        for s in slow:
            s.close()
        daemon.stop()


def held_open(sockets: list[socket.socket], wait: float = 0.5) -> tuple[int, int]:
    """(still open, closed by the daemon) after *wait* seconds."""
    time.sleep(wait)
    open_, closed = 0, 0
    for s in sockets:
        s.setblocking(False)
        try:
            data = s.recv(64)
        except BlockingIOError:
            open_ += 1
            continue
        except OSError:
            closed += 1
            continue
        closed += data == b""
    return open_, closed


def hold(sockets: list[socket.socket], count: int, port: int) -> tuple[int, int]:
    """Reopen the connections the daemon closed, top *sockets* up to *count*, then held_open()."""
    for s in [s for s in sockets if s.fileno() == -1 or closed_by_peer(s)]:
        s.close()
        sockets.remove(s)
    while len(sockets) < count:
        sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    return held_open(sockets, 0.1)


def refused_or(call: Callable[[], bytes]) -> bytes | None:
    """*call*'s answer, or ``None`` if the daemon closed the connection at once (over max_connections)."""
    try:
        return call()
    except (ConnectionResetError, BrokenPipeError):
        return None


def closed_by_peer(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(64) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_connections_beyond_max_connections_are_closed_at_once(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, port = start(tmp_path, root, "  max_connections: 100\n",
                         prefix=["prlimit", "--nofile=256:256", "--"], monkeypatch=monkeypatch)
    sockets: list[socket.socket] = []
    try:
        # The daemon may notice wait_for_port's probe closing only after some of these arrive, and
        # refuse one of them as the 101st: reopen any it closed until it holds all 100.
        wait_until(lambda: hold(sockets, 100, port) == (100, 0), 10, "100 connections accepted")
        extra = []
        started = time.monotonic()
        for _ in range(50):
            extra.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        assert held_open(extra, 1.0) == (0, 50)  # closed at once, not left hanging
        assert time.monotonic() - started < 5
        assert held_open(sockets, 0) == (100, 0)
        daemon.wait_for_log("purge.max_connections is 100")
        for s in sockets[:10]:
            s.close()
        # The daemon counts a connection closed once it has seen the close; until then it refuses the new one.
        wait_until(lambda: refused_or(lambda: purge(port, f"{root}/after.example\n".encode(), timeout=5)) == OK,
                   10, "a purge served")
        assert daemon.log.count("refusing purge connection") <= 100
    finally:
        for s in sockets:
            s.close()
        daemon.stop()


def test_the_soft_open_files_limit_is_raised_to_the_hard_limit(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, port = start(tmp_path, root, prefix=["prlimit", "--nofile=200:2048", "--"], monkeypatch=monkeypatch)
    sockets: list[socket.socket] = []
    try:
        daemon.wait_for_log("raised the open files limit from 200 to 2048")
        for _ in range(400):  # twice the soft limit the daemon was started with
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        assert purge(port, f"{root}/401st.example\n".encode(), timeout=5) == OK
        assert held_open(sockets, 0.2) == (400, 0)
    finally:
        for s in sockets:
            s.close()
        daemon.stop()


def test_the_purge_port_listens_with_a_backlog_of_1024(tmp_path: Path, root: Path) -> None:
    daemon, port = start(tmp_path, root)
    try:
        listing = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True)
        backlog = int(listing.stdout.split()[2])  # State Recv-Q Send-Q: Send-Q is the listen backlog
        with open("/proc/sys/net/core/somaxconn") as f:
            assert backlog == min(1024, int(f.read()))
    finally:
        daemon.stop()


# --- symlinks and the trash ------------------------------------------------------------------------


def test_a_prefix_purge_of_a_symlinked_zone_answers_error(tmp_path: Path, root: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    victim = write_entry(elsewhere, "httpsGETlinked.example/blog/1")
    (root / "linked.example").symlink_to(elsewhere)
    daemon, port = start(tmp_path, root)
    try:
        assert purge(port, b"https://linked.example/blog/*\n") == ERR
        assert purge(port, f"{root}/linked.example\n".encode()) == OK  # the link itself is removed, as before
        assert victim.exists()
        daemon.wait_for_log("refused: symlink at")
    finally:
        daemon.stop()


@pytest.mark.parametrize("target", ["/", "real"])
def test_a_root_that_is_a_symlink_refuses_to_start(tmp_path: Path, target: str) -> None:
    (tmp_path / "real").mkdir()
    link = tmp_path / "cache"
    link.symlink_to(target if target == "/" else tmp_path / target)
    daemon = Daemon(["--cache-root", str(link), "--purge-listen", f"tcp:{free_port()}:interface=127.0.0.1"], tmp_path)
    try:
        assert daemon.exit_code() == 78  # EX_CONFIG (issue 13)
        assert "is a symlink" in daemon.log and "give the real path" in daemon.log
    finally:
        daemon.stop()


def test_a_trash_writable_by_others_refuses_to_start(tmp_path: Path, root: Path) -> None:
    trash = root / ".cachesvc-trash"
    trash.mkdir()
    os.chmod(trash, 0o777)
    daemon = Daemon(["--cache-root", str(root), "--purge-listen", f"tcp:{free_port()}:interface=127.0.0.1"], tmp_path)
    try:
        assert daemon.exit_code() == 78  # EX_CONFIG (issue 13)
        assert "writable by group or others" in daemon.log and "chmod 700" in daemon.log
    finally:
        daemon.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory owned by another user")
def test_a_trash_owned_by_another_user_is_not_used(tmp_path: Path, root: Path) -> None:
    trash = root / ".cachesvc-trash"
    trash.mkdir(mode=0o700)
    (trash / "planted").mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(trash, nobody.pw_uid, nobody.pw_gid)
    zone = root / "site.example"
    for i in range(5):
        write_entry(zone, f"httpsGETsite.example/{i}")
    daemon, port = start(tmp_path, root)
    try:
        daemon.wait_for_log("refusing trash")
        assert purge(port, f"{zone}\n".encode()) == OK
        daemon.wait_for_log(f"purge '{zone}' deleted, 5 files")  # in place, before the reply
        assert zone.is_dir() and not any(zone.iterdir())
        assert os.listdir(trash) == ["planted"]  # nothing in it touched
    finally:
        daemon.stop()


# --- fair prefix scans, and a trash that keeps up ----------------------------------------------------


def make_zone(zone: Path, count: int, host: str) -> None:
    """*count* cache files laid out as nginx's levels=1:2 (fast: no md5 per file, names are unique)."""
    for i in range(count):
        d = zone / f"{i % 16:x}" / f"{(i // 16) % 256:02x}"
        if i < 4096:
            d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / f"{i:032x}", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, HEADER + f"\nKEY: httpsGET{host}/page/{i}\n".encode() + b"x" * 256)
        os.close(fd)


def test_prefix_purges_of_a_busy_zone_do_not_hold_up_another_zone(tmp_path: Path, root: Path) -> None:
    make_zone(root / "big.example", 20_000, "big.example")
    small = [write_entry(root / "small.example", f"httpsGETsmall.example/blog/{i}") for i in range(5)]
    daemon, port = start(tmp_path, root)
    try:
        with ThreadPoolExecutor(20) as pool:
            busy = [pool.submit(purge, port, b"https://big.example/nothing/*\n", True, 60) for _ in range(20)]
            time.sleep(0.2)  # the 20 scans of the big zone are under way
            started = time.monotonic()
            assert purge(port, b"https://small.example/blog/*\n") == OK
            waited = time.monotonic() - started
            big_done = [f.result() for f in busy]
        assert big_done == [OK] * 20
        assert not any(p.exists() for p in small)
        assert waited < 1.0, f"the small zone's prefix purge waited {waited:.2f} s behind the big zone's scans"
        assert daemon.log.count("purge 'https://big.example/nothing/*' absent, 0 of 20000 files matched") == 20
    finally:
        daemon.stop()


def test_the_trash_keeps_up_with_sustained_site_purges(tmp_path: Path, root: Path) -> None:
    daemon, port = start(tmp_path, root)
    trash = root / ".cachesvc-trash"
    zones = [root / f"site{i}.example" for i in range(8)]
    stop = time.monotonic() + 5
    backlog: list[int] = []

    def churn(zone: Path) -> int:
        purges = 0
        while time.monotonic() < stop:
            for d in range(4):  # a zone's top-level directories, each with a cache file below
                (zone / f"{d:x}" / "00").mkdir(parents=True, exist_ok=True)
                (zone / f"{d:x}" / "00" / f"{purges:032x}").write_bytes(b"x")
            assert purge(port, f"{zone}\n".encode()) == OK
            purges += 1
        return purges

    try:
        with ThreadPoolExecutor(len(zones)) as pool:
            counts = pool.map(churn, zones)
            while time.monotonic() < stop:
                backlog.append(len(os.listdir(trash)))
                time.sleep(0.1)
            total = sum(counts)
        assert total > 100
        # The background delete runs while purges go on (a trash that only grows, as a single nice-19
        # thread's did under load, would hold every purge). An absolute bound would measure the disk
        # and the machine's load: the figure belongs to bench/purge_bench.py, the property here.
        assert max(backlog) < total // 2, (
            f"trash backlog reached {max(backlog)} slots during {total} site purges: {backlog}"
        )
        wait_until(lambda: not os.listdir(trash), 60, "the trash emptied")
    finally:
        daemon.stop()
    assert "0 purged directories waiting for background deletion at stop" in daemon.log

