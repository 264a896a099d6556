"""Registry discovery beside a big EdgeComet keyspace: what an idle daemon costs Redis.

One ``redis-server`` of its own holds ``--keys`` unrelated ``meta:cache:{host}:{dim}:{hash}``
hashes (EdgeComet's cache metadata, made by a Lua loop in chunks of 50,000). Then, one after
another, with nothing queued and no gateway:

idle       no daemon: the reference.
notify     ``twistd cachesvc`` (tick_interval 1s) with keyspace notifications (CONFIG allowed).
scan       the same daemon where CONFIG is refused (ACL ``-config``, notifications off): the
           incremental SCAN mode.
old        the daemon of the commit before the registry watcher (``git archive`` into a temporary
           directory), which SCANs the keyspace on every tick and on every /status.

For each: Redis CPU (``used_cpu_sys + used_cpu_user`` from ``INFO cpu``) over an idle window, as a
percentage of one core, and SCAN calls a second (``INFO commandstats``); ``GET /status`` latency
(p50, max); and, for the watcher's modes, the time from writing ``registry:eg:bench-eg`` and
``service:render:bench-rs`` until ``/status`` shows both (``daemon.discovery.gateway_keys``,
``rs_capacity.total_free_tabs``).

Targets (issue 9, major 4): with notifications, Redis under 5 % CPU, /status under 50 ms, a new
gateway and Render Service found within 10 s; without them, found within 10 s.

    .venv/bin/python bench/discovery_bench.py [--keys 1000000] [--window 20] [--no-old]

About 90 s with the defaults. BENCH_KEEP_LOG=dir keeps the daemons' logs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

import redis as redis_py  # noqa: E402

from harness.daemon import Daemon, free_port  # noqa: E402
from harness.redis_server import RedisServer  # noqa: E402

KEY = "discovery-bench-key"
FILL = """for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
  redis.call('HSET', 'meta:cache:' .. (i % 7 + 1) .. ':1:' .. string.format('%016x', i * 2654435761),
             'url', 'https://example.com/page/' .. i, 'status_code', '200', 'size', '1024',
             'created_at', '1767225600', 'expires_at', '1767229200', 'source', 'render')
end
return 1"""
CHUNK = 50_000
STATUS_SAMPLES = 40


def write_config(base: Path, redis_addr: str, port: int) -> Path:
    (base / "hosts.d").mkdir(parents=True, exist_ok=True)
    (base / "hosts.d" / "hosts.yaml").write_text(
        "hosts:\n  - id: 1\n    domain: example.com\n    dimensions: {desktop: {id: 1}}\n")
    (base / "edge-gateway.yaml").write_text(f"internal: {{auth_key: {KEY}}}\nhosts: {{include: hosts.d}}\n")
    conf = base / "cache-daemon.yaml"
    conf.write_text(
        f'eg_config: edge-gateway.yaml\ndaemon_id: bench\nredis: {{addr: "{redis_addr}", password: "", db: 0}}\n'
        "scheduler: {tick_interval: 1s, normal_check_interval: 60s}\n"
        f'http_api: {{enabled: true, listen: "127.0.0.1:{port}", request_timeout: 30s}}\n'
        "metrics: {enabled: false}\n")
    for path in (base / "edge-gateway.yaml", conf):
        path.chmod(0o600)
    return conf


def status(port: int) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/status", headers={"X-Internal-Auth": KEY})
        response = conn.getresponse()
        body = json.loads(response.read())
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"/status answered {response.status}: {body}")
    return time.monotonic() - started, body


def cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def scan_calls(client: Any) -> int:
    return int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def idle_window(client: Any, seconds: float) -> tuple[float, float]:
    """(Redis CPU as % of one core, SCAN calls a second) over *seconds* of doing nothing."""
    c0, s0, t0 = cpu(client), scan_calls(client), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return (cpu(client) - c0) / elapsed * 100, (scan_calls(client) - s0) / elapsed


def latencies(port: int, samples: int) -> list[float]:
    return [status(port)[0] for _ in range(samples)]


def discovery_time(client: Any, port: int, limit: float = 30.0) -> float:
    """Seconds from registering a gateway and a Render Service until /status shows both."""
    seen = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.delete("registry:eg:bench-eg", "service:render:bench-rs")
    time.sleep(1.5)
    started = time.monotonic()
    client.set("registry:eg:bench-eg", json.dumps({"eg_id": "bench-eg", "address": "127.0.0.1:1",
                                                   "last_heartbeat": seen, "sharding_enabled": True}), ex=120)
    while True:
        # The RS is written again on every poll, with a fresh last_seen, as a Render Service's heartbeat does.
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        client.set("service:render:bench-rs", json.dumps({"id": "bench-rs", "address": "127.0.0.1", "port": 1,
                                                          "capacity": 10, "load": 0, "last_seen": now}), ex=3)
        _, body = status(port)
        found = body["daemon"].get("discovery", {})
        if found.get("gateway_keys", 0) >= 1 and body["rs_capacity"]["total_free_tabs"] >= 10:
            return time.monotonic() - started
        if time.monotonic() - started > limit:
            return float("inf")
        time.sleep(0.02)


def old_tree(work: Path) -> tuple[Path, str] | None:
    """The source of the commit before the registry watcher, or None where git cannot give it."""
    try:
        added = subprocess.run(["git", "log", "--format=%H", "--diff-filter=A", "-1", "--",
                                "cachesvc/recache/discovery.py"], cwd=TOP, capture_output=True, text=True, check=True)
        commit = added.stdout.strip() + "^"
        tree = work / "old-tree"
        tree.mkdir()
        archive = subprocess.run(["git", "archive", commit], cwd=TOP, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        short = subprocess.run(["git", "rev-parse", "--short", commit], cwd=TOP, capture_output=True, text=True)
        return tree, short.stdout.strip()
    except (subprocess.CalledProcessError, OSError):
        return None


class Run:
    def __init__(self, work: Path, redis_addr: str, name: str, tree: Path | None = None) -> None:
        self.dir = work / name
        self.dir.mkdir()
        self.port = free_port()
        conf = write_config(self.dir, redis_addr, self.port)
        env = {"PYTHONPATH": str(tree)} if tree else None
        self.started = time.monotonic()
        self.daemon = Daemon(["--config", str(conf)], self.dir, env=env)
        self.daemon.wait_for_port(self.port, 30)
        self.name = name

    def wait_synced(self, mode: str, timeout: float = 60.0) -> float:
        while time.monotonic() - self.started < timeout:
            found = status(self.port)[1]["daemon"].get("discovery", {})
            if found.get("synced") and found.get("mode") == mode:
                return time.monotonic() - self.started
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: not synced in {mode} mode within {timeout}s:\n{self.daemon.log[-3000:]}")

    def stop(self) -> None:
        self.daemon.stop()
        keep = os.environ.get("BENCH_KEEP_LOG")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(self.daemon.log_path, Path(keep) / f"{self.name}.log")


def row(name: str, cpu_pct: float, scans: float, took: list[float] | None, found: float | None, note: str) -> str:
    lat = f"{statistics.median(took) * 1000:.1f} / {max(took) * 1000:.1f}" if took else "-"
    disc = "-" if found is None else ("not found" if found == float("inf") else f"{found:.2f} s")
    return f"| {name} | {cpu_pct:.1f} % | {scans:.1f} | {lat} | {disc} | {note} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--window", type=float, default=20.0, help="idle window of the notifications run, s")
    parser.add_argument("--short-window", type=float, default=10.0, help="idle window of the other runs, s")
    parser.add_argument("--no-old", action="store_true", help="skip the daemon before the watcher")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="discovery-bench-"))
    server = RedisServer()
    server.start()
    client = redis_py.Redis(host="127.0.0.1", port=server.port)
    rows, failures = [], []
    try:
        t = time.monotonic()
        for start in range(0, args.keys, CHUNK):
            client.eval(FILL, 0, start, min(args.keys, start + CHUNK) - 1)
        print(f"{client.dbsize():,} unrelated keys made in {time.monotonic() - t:.1f} s; Redis 1 core = 100 %")

        idle_cpu, idle_scans = idle_window(client, args.short_window)
        rows.append(row("idle Redis, no daemon (reference)", idle_cpu, idle_scans, None, None, ""))

        run = Run(work, server.addr, "notify")
        synced = run.wait_synced("notifications")
        time.sleep(2)
        notify_cpu, notify_scans = idle_window(client, args.window)
        took = latencies(run.port, STATUS_SAMPLES)
        found = discovery_time(client, run.port)
        run.stop()
        rows.append(row("daemon, keyspace notifications", notify_cpu, notify_scans, took, found,
                        f"first full pass done {synced:.1f} s after start"))
        if notify_cpu >= 5 or statistics.median(took) >= 0.05 or found > 10:
            failures.append("notifications")

        client.config_set("notify-keyspace-events", "")  # our own server: as a Redis that never had them
        client.execute_command("ACL", "SETUSER", "default", "-config")
        run = Run(work, server.addr, "scan")
        synced = run.wait_synced("scan")
        time.sleep(2)
        scan_cpu, scan_scans = idle_window(client, args.short_window)
        took = latencies(run.port, STATUS_SAMPLES)
        found = discovery_time(client, run.port)
        run.stop()
        client.execute_command("ACL", "SETUSER", "default", "+config")
        rows.append(row("daemon, CONFIG refused: incremental SCAN", scan_cpu, scan_scans, took, found,
                        f"first full pass done {synced:.1f} s after start"))
        if found > 10:
            failures.append("scan")

        old = None if args.no_old else old_tree(work)
        if old is not None:
            tree, commit = old
            run = Run(work, server.addr, "old", tree)
            time.sleep(3)
            old_cpu, old_scans = idle_window(client, args.short_window)
            took = latencies(run.port, 3)
            run.stop()
            rows.append(row(f"old daemon ({commit}): SCAN per tick", old_cpu, old_scans, took, None,
                            "3 /status samples"))
    finally:
        client.close()
        server.close()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.keys:,} unrelated keys, tick_interval 1s, idle windows of {args.window:g} s "
          f"(notifications) and {args.short_window:g} s (others), {STATUS_SAMPLES} /status calls\n")
    print("| run | Redis CPU | SCAN calls/s | /status p50 / max (ms) | new EG + RS found | |")
    print("|---|---|---|---|---|---|")
    for line in rows:
        print(line)
    print("\nTARGET " + ("MISSED: " + ", ".join(failures) if failures else "MET")
          + " (notifications: CPU < 5 %, /status p50 < 50 ms, found < 10 s; scan: found < 10 s)")


if __name__ == "__main__":
    main()
