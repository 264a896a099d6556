"""Purge service throughput and latency against the loopback ceiling on this machine.

One new TCP connection per purge (the PHP client's pattern), at 1, 16 and 64 concurrent clients,
for paths that do not exist and for real files. The ceiling is a minimal Twisted server in its own
process that answers every line with ``Purge: Success`` and does nothing else; the same client
drives both, so the ratio is what cachesvc costs over the bare protocol.

    .venv/bin/python bench/purge_bench.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="purges per measurement")
    args = parser.parse_args()
    n = args.requests

    base = Path(tempfile.mkdtemp(prefix="cachesvc-bench-"))
    root = base / "cache"
    root.mkdir()
    daemon_port, ceiling_port = free_port(), free_port()
    daemon = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "--logfile=/dev/null", "cachesvc", "--cache-root", str(root),
         "--purge-listen", f"tcp:{daemon_port}:interface=127.0.0.1:backlog=1024"],
        cwd=base,
    )
    ceiling = subprocess.Popen([sys.executable, "-c", CEILING, str(ceiling_port)])
    try:
        wait_port(daemon_port)
        wait_port(ceiling_port)
        run(daemon_port, [f"{root}/warm/x\n".encode()] * 200, 16)
        run(ceiling_port, [b"/warm\n"] * 200, 16)
        print(f"purge benchmark: {n} purges per row, one TCP connection each, {sys.platform}, "
              f"{len(__import__('os').sched_getaffinity(0))} cores")
        header = f"{'workload':<14}{'clients':>8}{'cachesvc/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'ceiling/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>8}"
        print(header)
        print("-" * len(header))
        for workload in ("missing path", "real file"):
            for clients in (1, 16, 64):
                if workload == "missing path":
                    payloads = [f"{root}/missing.example/{i % 16:x}/{i:032x}\n".encode() for i in range(n)]
                else:
                    zone = root / f"files-{clients}.example"
                    payloads = make_files(zone, n)
                rate, p50, p99 = run(daemon_port, payloads, clients)
                if workload == "real file":
                    left = sum(1 for _ in zone.rglob("*") if _.is_file())
                    assert left == 0, f"{left} files were not purged"
                crate, cp50, cp99 = run(ceiling_port, payloads, clients)
                print(f"{workload:<14}{clients:>8}{rate:>12.0f}{p50:>9.2f}{p99:>9.2f}{crate:>12.0f}{cp50:>9.2f}{cp99:>9.2f}{rate / crate:>8.2f}")
    finally:
        daemon.terminate()
        ceiling.terminate()
        daemon.wait()
        ceiling.wait()
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
