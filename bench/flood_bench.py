"""A newline flood on the purge port: what another purge client and the API's /healthz see meanwhile.

One ``twistd cachesvc`` runs both halves against its own ``redis-server`` (the purge service on a
free loopback port with a temporary cache root, the recache half with one host and no Edge
Gateways, as in ``bench/stall_bench.py``).

Measured from the benchmark's main process: a purge client (the SpinupWP pattern: connect, one
line, read the reply, close) every 10 ms, purging a missing site directory (``Purge: Success``),
and ``GET /healthz`` every 50 ms. The flood comes from a process of its own (forked), so the
measuring process never waits for the flooder's GIL:

baseline  no flood, ``--baseline`` seconds (the reference).
burst     ``head -c 65536 /dev/zero | tr '\\0' '\\n'`` into the port once a second: 64 KiB of newlines
          in one write, 65,536 empty lines (each answers ``Purge: Error``); the daemon answers 4,096,
          refuses the next and closes, and the flooder connects again for the next second.
paced     the same 64 KiB a second in 4 KiB writes every 62.5 ms, so no write passes the 4,096-line
          bound and every empty line is answered: 65,536 refusals a second, the heavier case.

Target (issue 9): while one client floods 64 KiB of newlines per second, the other client's purge
replies and /healthz stay under 50 ms (max, every phase). Prints TARGET MET or TARGET MISSED and
always exits 0.

    .venv/bin/python bench/flood_bench.py [--seconds 12] [--baseline 5] [--quick]

BENCH_KEEP_LOG=file keeps the daemon's log.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.daemon import Daemon, free_port  # noqa: E402
from harness.redis_server import RedisServer  # noqa: E402
from harness.samples import Prober, Samples, outcomes, pct, purge_probe  # noqa: E402

KEY = "flood-bench-key"
HOST_ID = 1
DOMAIN = "example.com"
TARGET_MS = 50.0
PURGE_EVERY = 0.010
HEALTHZ_EVERY = 0.050
TIMEOUT = 10.0
FLOOD_BYTES = 65536  # per second
PATTERNS = {"burst": (FLOOD_BYTES, 1.0), "paced": (4096, 1.0 / 16)}  # (bytes per write, seconds between)


def healthz_probe(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        return str(response.status)
    finally:
        conn.close()


def flood_process(port: int, seconds: float, pattern: str, results: Any) -> None:
    """The flooder: 64 KiB of newlines a second, in *pattern*'s writes; reads every reply; reconnects when closed."""
    size, every = PATTERNS[pattern]
    chunk = b"\n" * size
    sent = replies = connections = refused_writes = 0
    end = time.monotonic() + seconds
    next_at = time.monotonic()
    sock: socket.socket | None = None
    while time.monotonic() < end:
        if sock is None:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                sock.setblocking(False)
                connections += 1
            except OSError:
                time.sleep(0.05)
                continue
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at += every
        try:
            sent += sock.send(chunk)  # what the daemon does not read stays unsent: its backpressure
        except BlockingIOError:
            refused_writes += 1
        except OSError:
            sock.close()
            sock = None
            continue
        while sock is not None and time.monotonic() < min(next_at, end):
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                time.sleep(0.002)
                continue
            except OSError:
                data = b""
            if not data:
                sock.close()
                sock = None
                break
            replies += data.count(b"\n")
    if sock is not None:
        sock.close()
    results.put({"sent": sent, "replies": replies, "connections": connections, "blocked writes": refused_writes})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=12.0, help="each flood phase (default 12)")
    parser.add_argument("--baseline", type=float, default=5.0, help="baseline phase (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s baseline, 5 s per flood phase")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.baseline = 5.0, 3.0
    if args.seconds > 15.0:
        print(f"--seconds {args.seconds:g} capped at 15 (the whole run stays under 40 s)")
        args.seconds = 15.0

    run_started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="cachesvc-floodbench-"))
    root = base / "cache"
    root.mkdir()
    redis = RedisServer()
    daemon: Daemon | None = None
    probers: list[Prober] = []
    try:
        redis.start()
        purge_port, api_port, metrics_port = free_port(), free_port(), free_port()
        (base / "hosts.yaml").write_text(f"hosts:\n  - id: {HOST_ID}\n    domain: {DOMAIN}\n"
                                         f"    dimensions:\n      desktop: {{id: 1}}\n")
        (base / "eg.yaml").write_text(f"internal: {{auth_key: {KEY}}}\nhosts: {{include: hosts.yaml}}\n")
        (base / "cd.yaml").write_text(
            f"eg_config: eg.yaml\ndaemon_id: flood-bench\nredis: {{addr: '{redis.addr}'}}\n"
            f"http_api: {{listen: '127.0.0.1:{api_port}'}}\n"
            f"metrics: {{enabled: true, listen: '127.0.0.1:{metrics_port}'}}\n"
            f"purge:\n  listen: tcp:{purge_port}:interface=127.0.0.1\n  roots: [{root}]\n"
        )
        daemon = Daemon(["--config", str(base / "cd.yaml")], base)
        daemon.wait_for_port(purge_port)
        daemon.wait_for_port(api_port)
        print(f"flood benchmark: one twistd cachesvc (purge + recache halves), its own redis-server {redis.addr}")
        print(f"probes from this process: a purge of {str(root / DOMAIN)!r} (missing: Purge: Success) every "
              f"{PURGE_EVERY * 1000:.0f} ms, GET /healthz every {HEALTHZ_EVERY * 1000:.0f} ms; "
              f"the flooder is a forked process")

        purger = Prober(lambda: purge_probe(purge_port, f"{root / DOMAIN}\n".encode(), TIMEOUT), PURGE_EVERY, TIMEOUT)
        health = Prober(lambda: healthz_probe(api_port), HEALTHZ_EVERY, TIMEOUT)
        probers = [purger, health]
        phases: list[tuple[str, Samples, Samples, dict[str, int], int]] = []
        for p in probers:
            p.start()
        log_before = len(daemon.log)
        time.sleep(args.baseline)
        phases.append(("baseline", purger.current, health.current, {}, len(daemon.log) - log_before))

        ctx = multiprocessing.get_context("fork")
        for pattern in PATTERNS:
            purger.current, health.current = Samples(), Samples()
            log_before = len(daemon.log)
            results: Any = ctx.SimpleQueue()
            flooder = ctx.Process(target=flood_process, args=(purge_port, args.seconds, pattern, results), daemon=True)
            flooder.start()
            flooder.join(args.seconds + TIMEOUT + 5)
            if flooder.is_alive():
                flooder.kill()
            counts = results.get() if not results.empty() else {}
            phases.append((pattern, purger.current, health.current, counts, len(daemon.log) - log_before))
        for p in probers:
            p.stop_event.set()
        for p in probers:
            p.join(TIMEOUT + 2)
        if daemon.proc.poll() is not None:
            print(f"the daemon exited during the run with status {daemon.proc.returncode}")

        print()
        print("| figure | " + " | ".join(name for name, *_ in phases) + " | target |")
        print("|---|" + "---:|" * len(phases) + "---|")

        def row(label: str, values: list[str], target: str = "") -> None:
            print(f"| {label} | " + " | ".join(values) + f" | {target} |")

        for what, index in (("purge reply", 1), ("/healthz", 2)):
            for p, name in ((50, "p50"), (99, "p99"), (100, "max")):
                row(f"{what} {name} ms", [f"{pct(ph[index].latencies, p):.1f}" for ph in phases],
                    f"< {TARGET_MS:.0f} ms" if p == 100 else "")
            row(f"{what} answers (over {TARGET_MS:.0f} ms)",
                [f"{len(ph[index].latencies)} ({sum(1 for s in ph[index].latencies if s * 1000 >= TARGET_MS)})"
                 for ph in phases], "0 over")
            row(f"{what} outcomes", [outcomes(ph[index].outcomes) for ph in phases],
                "all ok" if index == 1 else "all 200")
        row("flood: bytes sent / replies read",
            [f"{ph[3]['sent']:,} / {ph[3]['replies']:,}" if ph[3] else "" for ph in phases])
        row("flood: connections", [str(ph[3].get("connections", "")) for ph in phases])
        durations = [args.baseline] + [args.seconds] * len(PATTERNS)
        row("daemon log written, bytes/s", [f"{ph[4] / d:,.0f}" for ph, d in zip(phases, durations, strict=True)],
            "no line per refusal")
        print()

        reasons = []
        for name, purges, checks, counts, _ in phases[1:]:
            if not counts or counts["sent"] < FLOOD_BYTES * args.seconds * 0.5:
                reasons.append(f"{name}: the flooder sent {counts.get('sent', 0):,} bytes, not a flood")
            for what, samples, ok in (("purge", purges, "ok"), ("/healthz", checks, "200")):
                worst = pct(samples.latencies, 100)
                if not samples.latencies or not worst < TARGET_MS:
                    reasons.append(f"{name}: {what} max {worst:.1f} ms >= {TARGET_MS:.0f} ms")
                if set(samples.outcomes) - {ok}:
                    reasons.append(f"{name}: {what} outcomes {outcomes(samples.outcomes)}")
        if reasons:
            print("TARGET MISSED: " + "; ".join(reasons))
        else:
            worst_purge = max(pct(ph[1].latencies, 100) for ph in phases[1:])
            worst_health = max(pct(ph[2].latencies, 100) for ph in phases[1:])
            print(f"TARGET MET: under a 64 KiB/s newline flood, purge max {worst_purge:.1f} ms and /healthz max "
                  f"{worst_health:.1f} ms < {TARGET_MS:.0f} ms (baseline max {pct(phases[0][1].latencies, 100):.1f} "
                  f"and {pct(phases[0][2].latencies, 100):.1f} ms)")
        print(f"total run time {time.monotonic() - run_started:.1f} s")
    finally:
        for p in probers:
            p.stop_event.set()
        if daemon is not None:
            daemon.stop()
            if os.environ.get("BENCH_KEEP_LOG"):
                shutil.copy(daemon.log_path, os.environ["BENCH_KEEP_LOG"])
        redis.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
