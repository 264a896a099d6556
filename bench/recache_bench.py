"""Recache scheduler drain, against the ideal the render capacity allows.

10,000 due entries over 5 hosts; one Edge Gateway whose renders take 200 ms and occupy a tab of a
Render Service with capacity 100; ``rs_capacity_reserved`` 0.3, so the line is 70 tabs. The ideal
drain is N x latency / budget = 10,000 x 0.2 s / 70 = 28.6 s. Printed: the drain time and its ratio
to the ideal (target: at most 1.15), the peak render load against the line, the daemon's CPU
seconds per 1,000 URLs, and the Redis commands per URL (scripts' inner commands included).

    .venv/bin/python bench/recache_bench.py [--entries 10000] [--latency 0.2]

BENCH_PROFILE=file writes a cProfile of the daemon; BENCH_KEEP_LOG=file keeps the gateway's request log.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis as redis_py  # noqa: E402

from cachesvc.recache.members import encode_member  # noqa: E402
from harness.daemon import Daemon, free_port  # noqa: E402
from harness.fake_eg import FakeEG  # noqa: E402
from harness.redis_server import RedisServer  # noqa: E402

HOSTS = 5


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_calls(client: redis_py.Redis) -> int:
    """Commands Redis ran for the daemon: all but INFO (this script) and SET (the gateway's registry writes)."""
    return sum(v["calls"] for k, v in client.info("commandstats").items() if k not in ("cmdstat_info", "cmdstat_set"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=10000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--capacity", type=int, default=100)
    parser.add_argument("--reserved", type=float, default=0.3)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="cachesvc-recachebench-"))
    server = RedisServer()
    server.start()
    client = redis_py.Redis(port=server.port)
    eg = FakeEG(base, server.addr, "--delay", str(args.latency), "--capacity", str(args.capacity))
    port = free_port()
    hosts = "".join(
        f"  - id: {h}\n    domain: h{h}.example.com\n    dimensions: {{desktop: {{id: 1}}}}\n"
        for h in range(1, HOSTS + 1)
    )
    (base / "hosts.yaml").write_text("hosts:\n" + hosts)
    (base / "eg.yaml").write_text("internal: {auth_key: k}\nhosts: {include: hosts.yaml}\n")
    (base / "cd.yaml").write_text(
        f"eg_config: eg.yaml\ndaemon_id: bench\nredis: {{addr: '{server.addr}'}}\n"
        f"scheduler: {{tick_interval: 1s, normal_check_interval: 60s}}\n"
        f"recache: {{rs_capacity_reserved: {args.reserved}, timeout_per_url: 10s}}\n"
        f"http_api: {{listen: '127.0.0.1:{port}'}}\n"
    )
    line = int((1 - args.reserved) * args.capacity + 1e-9)
    now = int(time.time())
    per_host = args.entries // HOSTS
    for h in range(1, HOSTS + 1):
        client.zadd(
            f"recache:{h}:normal", {encode_member(f"https://h{h}.example.com/p{i}", 1): now for i in range(per_host)}
        )
    calls_before = redis_calls(client)
    profile = (
        ["--profile", os.environ["BENCH_PROFILE"], "--profiler", "cprofile", "--savestats"]
        if os.environ.get("BENCH_PROFILE")
        else []
    )
    daemon = Daemon(["--config", str(base / "cd.yaml")], base, twistd_args=profile)
    try:
        daemon.wait_for_port(port)
        cpu_start = cpu_seconds(daemon.proc.pid)
        deadline = time.monotonic() + 600
        while (stats := eg.stats())["answered"] < args.entries:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {stats['answered']} of {args.entries} delivered in 600 s")
            time.sleep(0.2)
        # From the first request (Go's timing: the first tick comes one interval after start) to the last answer.
        drain = stats["last_answer"] - stats["first_request"]
        cpu = cpu_seconds(daemon.proc.pid) - cpu_start
        calls = redis_calls(client) - calls_before
        ideal = args.entries * args.latency / line
        print(f"recache benchmark: {args.entries} entries over {HOSTS} hosts, renders of {args.latency * 1000:.0f} ms, "
              f"capacity {args.capacity}, reserved {args.reserved:.0%} (line {line} tabs)")
        print(
            f"drain (first request to last answer) {drain:.1f} s; ideal N x latency / budget = {ideal:.1f} s; "
            f"ratio {drain / ideal:.2f} (target <= 1.15)"
        )
        print(
            f"peak render load {stats['peak']} against the line of {line}; "
            f"duplicates in flight {stats['duplicates_in_flight']}"
        )
        if os.environ.get("BENCH_KEEP_LOG"):
            shutil.copy(eg.log, os.environ["BENCH_KEEP_LOG"])
            shutil.copy(daemon.log_path, os.environ["BENCH_KEEP_LOG"] + ".daemon")
        print(
            f"scheduler CPU {cpu / args.entries * 1000:.2f} s per 1,000 URLs; "
            f"Redis commands per URL {calls / args.entries:.1f} "
            f"(the daemon's, counting the commands inside its scripts)"
        )
    finally:
        daemon.stop()
        eg.stop()
        server.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
