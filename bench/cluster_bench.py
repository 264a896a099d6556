"""Cluster purges (issue 12): reply latency through three nodes beside one node alone, and how soon C follows.

Three ``twistd cachesvc`` daemons with ``purge.cluster`` (three cache roots on this machine, one
``redis-server`` of the benchmark's own on loopback, heartbeat 1 s, wait 2 s) and, as the reference,
one daemon with the same config but no ``cluster``. Each purge names one real version-5 cache file
(harness.nginxfiles.write_entry), present on every node: the PHP client's pattern, a new TCP
connection per line, one read of the reply.

1. Reply latency (connect to ``Purge: Success``) of ``--purges`` single-file purges sent to A, one
   client at a time, then 16 at once (with purges answered per second); the same purges on the lone
   node. Targets: cluster p50 <= 10 ms, p99 <= 50 ms (one client).
2. From A's reply to the entry's removal on C (C's file polled right after the reply): by
   construction 0 (C acknowledged its purge before A answered); any other figure is a bug. Also the
   count of files still present on B or C at A's reply, which must be 0.

    .venv/bin/python bench/cluster_bench.py [--purges 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from harness.daemon import Daemon, free_port  # noqa: E402
from harness.nginxfiles import write_entry  # noqa: E402
from harness.redis_server import RedisServer  # noqa: E402

HOST = "bench.example"


class Node:
    def __init__(self, base: Path, name: str, redis: str | None) -> None:
        self.name, self.port = name, free_port()
        self.root = base / name / "cache"
        self.root.mkdir(parents=True)
        conf = base / name / "cachesvc.yaml"
        cluster = (f"  cluster:\n    redis: {redis}\n    node: {name}\n    stream: bench:purge\n    wait: 2s\n"
                   "    heartbeat: 1s\n") if redis else ""
        conf.write_text(
            f"purge:\n  listen: tcp:{self.port}:interface=127.0.0.1\n  roots: [{self.root}]\n"
            f"  zones:\n    - hosts: ['*']\n      path: {self.root}/{{host}}\n{cluster}"
        )
        self.daemon = Daemon(["--config", str(conf)], base / name)

    @property
    def zone(self) -> Path:
        return self.root / HOST

    def files(self, first: int, count: int) -> list[Path]:
        return [write_entry(self.zone, f"httpGET{HOST}/page/{i}/") for i in range(first, first + count)]


def purge(port: int, path: Path) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"{path}\n".encode())
        reply = s.recv(512)
    seconds = time.perf_counter() - started
    if reply != b"Purge: Success\n":
        raise SystemExit(f"{path}: unexpected reply {reply!r}")
    return seconds


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    return statistics.median(ordered) * 1000, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


def sequential(port: int, paths: list[Path], after: list[list[Path]]) -> tuple[list[float], list[float], int]:
    """Reply latencies; seconds from each reply until the file went on the first of *after*; files left then."""
    latencies, follow, left = [], [], 0
    for i, path in enumerate(paths):
        latencies.append(purge(port, path))
        replied = time.perf_counter()
        present = [other[i].exists() for other in after]
        left += sum(present)
        if present and present[0]:  # still on C at A's reply: how long until it went
            while after[0][i].exists():
                time.sleep(0.0002)
            follow.append(time.perf_counter() - replied)
        else:
            follow.append(0.0)
    return latencies, follow, left


def concurrent(port: int, paths: list[Path], clients: int = 16) -> tuple[list[float], float]:
    """Reply latencies of *paths* sent by *clients* at once, and purges answered per second."""
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(lambda p: purge(port, p), paths))
    return latencies, len(paths) / (time.perf_counter() - started)


def line(label: str, seconds: list[float], reference: list[float], target: str = "", rates: str = "") -> str:
    (p50, p99), (r50, r99) = percentiles(seconds), percentiles(reference)
    text = f"  {label:<25}p50 {p50:6.2f} ms  p99 {p99:6.2f} ms{rates}"
    text += f"   one node alone: p50 {r50:.2f} ms, p99 {r99:.2f} ms"
    return text + (f"   target {target}" if target else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--purges", type=int, default=2000)
    n = parser.parse_args().purges
    base = Path(tempfile.mkdtemp(prefix="cachesvc-clusterbench-"))
    redis = RedisServer()
    nodes: list[Node] = []
    print(f"cluster purge benchmark on {sys.platform}, {len(os.sched_getaffinity(0))} cores, {n:,} purges a run")
    try:
        redis.start()
        nodes = [Node(base, name, redis.addr) for name in ("A", "B", "C")] + [Node(base, "alone", None)]
        for node in nodes:
            node.daemon.wait_for_port(node.port, 60)
        time.sleep(3.5)  # every node has seen every other's heartbeat
        a, b, c, alone = nodes
        warm = [node.files(0, 200) for node in nodes]
        sequential(a.port, warm[0], [warm[2], warm[1]])
        sequential(alone.port, warm[3], [])

        files = [node.files(1000, n) for node in nodes]
        cluster_s, follow_s, left = sequential(a.port, files[0], [files[2], files[1]])
        alone_s, _, _ = sequential(alone.port, files[3], [])
        more = [node.files(1000 + n, n) for node in nodes]
        cluster_16, cluster_rate = concurrent(a.port, more[0])
        alone_16, alone_rate = concurrent(alone.port, more[3])
        still = sum(p.exists() for ps in more for p in ps)

        print("\nreply latency of single-file purges sent to A (connect to Purge: Success)")
        print(line("three nodes, one client", cluster_s, alone_s, "p50 <= 10 ms, p99 <= 50 ms"))
        print(line("three nodes, 16 clients", cluster_16, alone_16,
                   rates=f" ({cluster_rate:.0f}/s; alone {alone_rate:.0f}/s)"))
        f50, f99 = percentiles(follow_s)
        print("\nA's reply to the entry's removal on C (polled right after the reply)")
        print(f"  p50 {f50:.2f} ms   p99 {f99:.2f} ms   max {max(follow_s) * 1000:.2f} ms   "
              "reference 0 (C acknowledged before A answered)")
        print(f"  files still on B or C at A's reply: {left} of {2 * n}   reference 0")
        print(f"  files left anywhere after the 16-client run: {still}   reference 0")
        p50, p99 = percentiles(cluster_s)
        verdict = "met" if p50 <= 10 and p99 <= 50 and left == 0 and still == 0 else "NOT met"
        print(f"\ntargets {verdict}")
    finally:
        for node in nodes:
            node.daemon.stop()
        redis.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
