"""Purge service figures, each beside the reference it is judged against.

protocol  One new TCP connection per purge (the PHP client's pattern), at 1, 16 and 64 concurrent
          clients, for paths that do not exist and for real files, against a minimal Twisted server
          in its own process that answers every line and does nothing else (the loopback ceiling).
site      Reply latency of a zone purge and the time until its files are physically gone, for
          10,000 and 100,000 files, against `rm -rf` on an identical tree.
url       URL purges per second (16 clients), each URL mapped to its nginx cache files.
prefix    A prefix purge's scan of a 100,000-file zone, against a tight loop in a separate
          process that reads the same headers (open, read 1 KiB, close) and does nothing else.

    .venv/bin/python bench/purge_bench.py [--requests 3000] [--only protocol,site,url,prefix]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

TWISTD = str(Path(sys.executable).parent / "twistd")
ROUNDS = 3
"""Protocol rows alternate daemon and ceiling this many times and compare the medians."""

CORES = sorted(os.sched_getaffinity(0))
SERVER_CORES = set(CORES[1:]) or set(CORES)
"""With two cores or more the client runs on the first and each server on the others, so that the
scheduler cannot put a server and the client on one core for one run and on two for the next (the
ceiling's rate moved by 30 % between identical runs)."""


def on_server_cores() -> None:
    os.sched_setaffinity(0, SERVER_CORES)

CEILING = textwrap.dedent(
    """
    import sys
    from twisted.internet import protocol, reactor
    from twisted.protocols.basic import LineReceiver

    class Echo(LineReceiver):
        delimiter = b"\\n"
        def lineReceived(self, line):
            self.transport.write(b"Purge: Success\\n")

    f = protocol.ServerFactory()
    f.protocol = Echo
    reactor.listenTCP(int(sys.argv[1]), f, interface="127.0.0.1", backlog=1024)
    reactor.run()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


async def one(port: int, payload: bytes) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    reply = await reader.read(512)
    writer.close()
    if reply != b"Purge: Success\n":
        raise SystemExit(f"unexpected reply {reply!r}")
    return time.perf_counter() - started


async def load(port: int, payloads: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    queue = list(reversed(payloads))
    latencies: list[float] = []

    async def worker() -> None:
        while queue:
            latencies.append(await one(port, queue.pop()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def run(port: int, payloads: list[bytes], concurrency: int) -> tuple[float, float, float]:
    elapsed, lat = asyncio.run(load(port, payloads, concurrency))
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return len(payloads) / elapsed, statistics.median(lat) * 1000, p99 * 1000


def make_files(zone: Path, count: int) -> list[bytes]:
    paths = []
    for i in range(count):
        d = zone / f"{i % 16:x}" / f"{i % 256:02x}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:032x}"
        p.write_bytes(b"x" * 512)
        paths.append(f"{p}\n".encode())
    return paths


def start_daemon(base: Path, root: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    conf = base / "bench.yaml"
    conf.write_text(
        f"purge:\n  listen: tcp:{port}:interface=127.0.0.1:backlog=1024\n  roots: [{root}]\n"
        f"  zones:\n    - hosts: ['*']\n      path: {root}/{{host}}\n"
    )
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", f"--logfile={log}", "cachesvc", "--config", str(conf)], cwd=base,
        preexec_fn=on_server_cores,
    )
    wait_port(port)
    return proc


def make_tree(zone: Path, count: int, key_of=None) -> None:
    """A zone laid out like nginx's levels=1:2: 16 x 256 directories, *count* files."""
    header = bytes(336)
    for i in range(count):
        d = zone / f"{i % 16:x}" / f"{(i // 16) % 256:02x}"
        if i < 4096:
            d.mkdir(parents=True, exist_ok=True)
        key = key_of(i) if key_of else f"httpsGETbench.example/{i}"
        fd = os.open(d / f"{i:032x}", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, header + b"\nKEY: " + key.encode() + b"\n" + b"x" * 512)
        os.close(fd)


def background_seconds(log: Path, zone: Path, timeout: float = 120) -> float:
    pattern = re.compile(rf"background delete of '{re.escape(str(zone))}' finished: (\d+) files in ([\d.]+) s")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(log.read_text())
        if match:
            return float(match.group(2))
        time.sleep(0.02)
    raise SystemExit(f"no background delete of {zone} logged")


def one_purge(port: int, line: bytes) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(line)
        reply = s.recv(512)
    assert reply == b"Purge: Success\n", reply
    return time.perf_counter() - started


def bench_site(base: Path, root: Path, port: int, log: Path) -> None:
    print("\nsite purge: reply latency and time until physically gone, against rm -rf on an identical tree")
    print(f"{'files':>8}{'reply ms':>10}{'gone s':>9}{'rm -rf s':>10}{'gone / rm':>11}")
    for count in (10_000, 100_000):
        reference, zone = base / f"rm-{count}", root / f"site-{count}.example"
        make_tree(reference, count)
        make_tree(zone, count)
        os.sync()
        started = time.perf_counter()
        subprocess.run(["rm", "-rf", str(reference)], check=True)
        rm = time.perf_counter() - started
        reply = one_purge(port, f"{zone}\n".encode())
        gone = reply + background_seconds(log, zone)
        print(f"{count:>8}{reply * 1000:>10.2f}{gone:>9.2f}{rm:>10.2f}{gone / rm:>11.2f}")


def bench_url(root: Path, port: int, n: int) -> None:
    zone = root / "url.example"
    make_tree(zone, 0)
    for i in range(n):  # the real nginx names, so every purge deletes one file
        key = f"httpsGETurl.example/post-{i}/"
        digest = hashlib.md5(key.encode()).hexdigest()
        d = zone / digest[-1] / digest[-3:-1]
        d.mkdir(parents=True, exist_ok=True)
        (d / digest).write_bytes(b"x")
    payloads = [f"https://url.example/post-{i}\n".encode() for i in range(n)]
    rate, p50, p99 = run(port, payloads, 16)
    left = sum(len(f) for _, _, f in os.walk(zone))
    assert left == 0, f"{left} files were not purged"
    print(
        f"\nURL purges, 16 clients, 4 candidate files each (GET/HEAD x twin): {rate:.0f}/s, "
        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"
    )


TIGHT_LOOP = """
import os, sys, time
started = time.perf_counter()
n = 0
for top, dirs, files in os.walk(sys.argv[1]):
    for name in files:
        fd = os.open(os.path.join(top, name), os.O_RDONLY)
        os.read(fd, 1024)
        os.close(fd)
        n += 1
print(n, time.perf_counter() - started)
"""


def bench_prefix(root: Path, port: int) -> None:
    count = 100_000
    zone = root / "prefix.example"
    make_tree(zone, count, key_of=lambda i: f"httpsGETprefix.example/{'blog' if i % 100 == 0 else 'page'}/{i}")
    reference = []
    for _ in range(2):  # the first pass also warms the page cache for both
        out = subprocess.run([sys.executable, "-c", TIGHT_LOOP, str(zone)], capture_output=True, text=True, check=True)
        files, seconds = out.stdout.split()
        assert int(files) == count
        reference.append(float(seconds))
    scan = one_purge(port, b"https://prefix.example/blog/*\n")
    left = sum(len(f) for _, _, f in os.walk(zone))
    assert left == count - count // 100, left
    ref = min(reference)
    print(f"\nprefix purge of {count} files (1% match): {scan:.2f} s = {count / scan:,.0f} files/s; "
          f"tight read loop in another process: {ref:.2f} s = {count / ref:,.0f} files/s; speed ratio {ref / scan:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="purges per protocol/url measurement")
    parser.add_argument("--only", default="protocol,site,url,prefix", help="comma-separated sections to run")
    args = parser.parse_args()
    sections = set(args.only.split(","))

    base = Path(tempfile.mkdtemp(prefix="cachesvc-bench-"))
    root = base / "cache"
    root.mkdir()
    log = base / "daemon.log"
    daemon_port, ceiling_port = free_port(), free_port()
    daemon = start_daemon(base, root, daemon_port, log)
    ceiling = subprocess.Popen([sys.executable, "-c", CEILING, str(ceiling_port)], preexec_fn=on_server_cores)
    if len(CORES) > 1:
        os.sched_setaffinity(0, {CORES[0]})  # the client
    try:
        wait_port(ceiling_port)
        print(f"purge benchmark on {sys.platform}, {len(CORES)} cores: client on core {CORES[0]}, "
              f"servers on {sorted(SERVER_CORES)}")
        if "protocol" in sections:
            bench_protocol(root, daemon_port, ceiling_port, args.requests)
        if "site" in sections:
            bench_site(base, root, daemon_port, log)
        if "url" in sections:
            bench_url(root, daemon_port, args.requests)
        if "prefix" in sections:
            bench_prefix(root, daemon_port)
    finally:
        daemon.terminate()
        ceiling.terminate()
        daemon.wait()
        ceiling.wait()
        shutil.rmtree(base)


def bench_protocol(root: Path, daemon_port: int, ceiling_port: int, n: int) -> None:
    run(daemon_port, [f"{root}/warm/x\n".encode()] * 200, 16)
    run(ceiling_port, [b"/warm\n"] * 200, 16)
    print(f"\nprotocol: {n} purges per row ({ROUNDS} alternating rounds, medians), one TCP connection each")
    header = (
        f"{'workload':<14}{'clients':>8}{'cachesvc/s':>12}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'ceiling/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>8}"
    )
    print(header)
    print("-" * len(header))
    for workload in ("missing path", "real file"):
        for clients in (1, 16, 64):
            # Daemon and ceiling take turns, ROUNDS times, so that a machine that slows down for a
            # moment slows both; the medians are compared.
            ours, theirs = [], []
            for round_ in range(ROUNDS):
                count = n // ROUNDS
                if workload == "missing path":
                    payloads = [f"{root}/missing.example/{i % 16:x}/{i:032x}\n".encode() for i in range(count)]
                else:
                    zone = root / f"files-{clients}-{round_}.example"
                    payloads = make_files(zone, count)
                ours.append(run(daemon_port, payloads, clients))
                if workload == "real file":
                    left = sum(len(f) for _, _, f in os.walk(zone))
                    assert left == 0, f"{left} files were not purged"
                theirs.append(run(ceiling_port, payloads, clients))
            rate, p50, p99 = (statistics.median(x) for x in zip(*ours, strict=True))
            crate, cp50, cp99 = (statistics.median(x) for x in zip(*theirs, strict=True))
            print(
                f"{workload:<14}{clients:>8}{rate:>12.0f}{p50:>9.2f}{p99:>9.2f}"
                f"{crate:>12.0f}{cp50:>9.2f}{cp99:>9.2f}{rate / crate:>8.2f}"
            )

if __name__ == "__main__":
    main()
