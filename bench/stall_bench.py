"""The reactor never stalls: purge reply latency while the Cache Daemon API is loaded.

One ``twistd cachesvc`` runs both halves against its own ``redis-server``: the purge service on a
free loopback port (a temporary cache root) and the recache half (one host, id 1, one dimension, no
Edge Gateways, so the scheduler dispatches nothing). Before the daemon starts, ``recache:1:normal``
is filled with ``--entries`` members in Go's bytes (``{"url":"https://example.com/p/123",
"dimension_id":1}``, scores a unix time).

A purge client (the SpinupWP pattern: connect, one line, read the reply, close) purges a missing
site directory every 10 ms; each reply's latency is recorded.

baseline  the purge client alone for ``--baseline`` seconds (the reference).
load      for ``--seconds``: one client POSTs /internal/cache/recache with 10,000 distinct URLs, over
          and over (a window that walks over the queued URLs, so the queue stays at ``--entries``);
          one client lists the queue (GET /internal/cache/queue, limit 100, cursor 0, 100 and a deep
          one, all priorities and ``priority=normal``); one polls GET /healthz. Requests in flight at
          the end are waited for (bounded by their timeouts) and counted, and the purge client keeps
          sampling until they are done.

Target: under load, no purge reply takes more than 50 ms and every listing answers 200. The
benchmark prints TARGET MET or TARGET MISSED and always exits 0.

    .venv/bin/python bench/stall_bench.py [--seconds 15] [--entries 200000] [--quick]

BENCH_KEEP_LOG=file keeps the daemon's log.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis as redis_py  # noqa: E402

from harness.daemon import Daemon, free_port  # noqa: E402
from harness.redis_server import RedisServer  # noqa: E402
from harness.samples import Prober, Samples, mean_ms, outcomes, pct, purge_probe  # noqa: E402

KEY = "stall-bench-key"
HOST_ID = 1
DIMENSION_ID = 1
DOMAIN = "example.com"
BATCH = 10_000  # URLs per recache request
TARGET_MS = 50.0
PURGE_EVERY = 0.010
PURGE_TIMEOUT = 5.0
HTTP_TIMEOUT = 15.0
HEALTHZ_EVERY = 0.050
HEALTHZ_TIMEOUT = 5.0


def url(i: int) -> str:
    return f"https://{DOMAIN}/p/{i}"


def member(i: int) -> bytes:
    # Go's encoding/json bytes for these ASCII URLs (nothing to escape).
    return b'{"url":"' + url(i).encode() + b'","dimension_id":' + str(DIMENSION_ID).encode() + b"}"


def fill_queue(port: int, entries: int) -> float:
    client = redis_py.Redis(port=port)
    started = time.perf_counter()
    score = int(time.time())
    pipe = client.pipeline(transaction=False)
    for start in range(0, entries, 10_000):
        pipe.zadd(f"recache:{HOST_ID}:normal", {member(i): score for i in range(start, min(start + 10_000, entries))})
    pipe.execute()
    count = client.zcard(f"recache:{HOST_ID}:normal")
    client.close()
    if count != entries:
        raise SystemExit(f"queue holds {count} entries, expected {entries}")
    return time.perf_counter() - started


# --- samplers ------------------------------------------------------------------------------------


def http_call(port: int, method: str, path: str, body: bytes | None, timeout: float) -> tuple[str, float | None]:
    """(outcome, seconds to the whole reply): a new connection per call, like a script with curl."""
    headers = {"X-Internal-Auth": KEY}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started = time.perf_counter()
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return str(response.status), time.perf_counter() - started
    except TimeoutError:
        return "timeout", None
    except (OSError, http.client.HTTPException) as e:
        return f"error {type(e).__name__}", None
    finally:
        conn.close()


def recache_loop(port: int, entries: int, stop: threading.Event, samples: Samples) -> None:
    start = 0
    while not stop.is_set():
        ids = [(start + i) % entries for i in range(min(BATCH, entries))]
        start = (start + BATCH) % entries
        body = json.dumps({"host_id": HOST_ID, "urls": [url(i) for i in ids], "priority": "normal"}).encode()
        outcome, seconds = http_call(port, "POST", "/internal/cache/recache", body, HTTP_TIMEOUT)
        samples.add(outcome, seconds)
        if seconds is None:
            stop.wait(0.2)  # a refused connection must not spin


def listing_loop(port: int, entries: int, stop: threading.Event, samples: Samples) -> None:
    deep = min(150_000, entries * 3 // 4)
    pages = [f"&cursor={c}{p}" for p in ("", "&priority=normal") for c in (0, 100, deep)]
    n = 0
    while not stop.is_set():
        path = f"/internal/cache/queue?host_id={HOST_ID}&limit=100{pages[n % len(pages)]}"
        n += 1
        outcome, seconds = http_call(port, "GET", path, None, HTTP_TIMEOUT)
        samples.add(outcome, seconds)
        if seconds is None:
            stop.wait(0.2)


def load_process(port: int, entries: int, seconds: float, results: Any) -> None:
    """The load generator's process: recache POSTs and queue listings for *seconds*, then the samples."""
    stop = threading.Event()
    recaches, listings = Samples(), Samples()
    threads = [
        threading.Thread(target=recache_loop, args=(port, entries, stop, recaches), daemon=True),
        threading.Thread(target=listing_loop, args=(port, entries, stop, listings), daemon=True),
    ]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(HTTP_TIMEOUT + 5)
    for name, samples in (("recache", recaches), ("listing", listings)):
        with samples.lock:
            results.put((name, dict(samples.outcomes), list(samples.latencies)))


def healthz_loop(port: int, stop: threading.Event, samples: Samples) -> None:
    while not stop.is_set():
        outcome, seconds = http_call(port, "GET", "/healthz", None, HEALTHZ_TIMEOUT)
        samples.add(outcome, seconds)
        stop.wait(HEALTHZ_EVERY)


# --- figures -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="load phase (default 15)")
    parser.add_argument("--entries", type=int, default=200_000, help="queue entries to list (default 200000)")
    parser.add_argument("--baseline", type=float, default=3.0, help="baseline phase (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 s of load, 20,000 entries, 2 s baseline")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.entries, args.baseline = 5.0, 20_000, 2.0
    if args.seconds > 30.0:
        print(f"--seconds {args.seconds:g} capped at 30 (the whole run stays under a minute)")
        args.seconds = 30.0
    if args.entries < 1:
        parser.error("--entries must be >= 1")

    run_started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="cachesvc-stallbench-"))
    root = base / "cache"
    root.mkdir()
    redis = RedisServer()
    daemon: Daemon | None = None
    purger: Prober | None = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        redis.start()
        fill_seconds = fill_queue(redis.port, args.entries)
        purge_port, api_port, metrics_port = free_port(), free_port(), free_port()
        (base / "hosts.yaml").write_text(
            f"hosts:\n  - id: {HOST_ID}\n    domain: {DOMAIN}\n    dimensions:\n      desktop: {{id: {DIMENSION_ID}}}\n"
        )
        (base / "eg.yaml").write_text(f"internal: {{auth_key: {KEY}}}\nhosts: {{include: hosts.yaml}}\n")
        (base / "cd.yaml").write_text(
            f"eg_config: eg.yaml\ndaemon_id: stall-bench\nredis: {{addr: '{redis.addr}'}}\n"
            f"http_api: {{listen: '127.0.0.1:{api_port}'}}\n"
            f"metrics: {{enabled: true, listen: '127.0.0.1:{metrics_port}'}}\n"
            f"purge:\n  listen: tcp:{purge_port}:interface=127.0.0.1\n  roots: [{root}]\n"
        )
        daemon = Daemon(["--config", str(base / "cd.yaml")], base)
        daemon.wait_for_port(purge_port)
        daemon.wait_for_port(api_port)

        print(f"stall benchmark: one twistd cachesvc (purge + recache halves), its own redis-server {redis.addr}")
        print(f"queue recache:{HOST_ID}:normal filled with {args.entries:,} entries in {fill_seconds:.1f} s; "
              f"no Edge Gateways (nothing dispatched)")
        print(f"purge client: one connection per purge every {PURGE_EVERY * 1000:.0f} ms, "
              f"line {str(root / DOMAIN)!r} (missing: Purge: Success)")

        line = f"{root / DOMAIN}\n".encode()
        purger = Prober(lambda: purge_probe(purge_port, line, PURGE_TIMEOUT), PURGE_EVERY, PURGE_TIMEOUT)
        baseline = purger.current
        purger.start()
        time.sleep(args.baseline)

        load = Samples()
        purger.current = load
        healthz = Samples()
        # The load runs in a process of its own: building and parsing 10,000-URL bodies must not hold
        # the GIL of the process that measures the purge and /healthz latencies.
        results: Any = multiprocessing.get_context("fork").SimpleQueue()
        loader = multiprocessing.get_context("fork").Process(
            target=load_process, args=(api_port, args.entries, args.seconds, results), daemon=True
        )
        threads = [threading.Thread(target=healthz_loop, args=(api_port, stop, healthz), daemon=True)]
        load_started = time.monotonic()
        loader.start()
        for t in threads:
            t.start()
        loader.join(args.seconds + HTTP_TIMEOUT + 10)
        if loader.is_alive():
            loader.kill()
        stop.set()
        for t in threads:
            t.join(HTTP_TIMEOUT + 5)
        load_seconds = time.monotonic() - load_started
        received = {}
        while not results.empty():
            name, counts, latencies = results.get()
            received[name] = Samples(latencies, Counter(counts))
        recaches, listings = received.get("recache", Samples()), received.get("listing", Samples())
        purger.stop_event.set()
        purger.join(PURGE_TIMEOUT + 2)
        if daemon.proc.poll() is not None:
            print(f"the daemon exited during the run with status {daemon.proc.returncode}")

        print()
        print(f"load phase {load_seconds:.1f} s (requests in flight at {args.seconds:g} s waited for); "
              f"baseline {args.baseline:g} s; daemon log: {daemon.log.count('Unhandled')} 'Unhandled' line(s)")
        print()
        print("| figure | baseline | under load | target |")
        print("|---|---:|---:|---|")
        for label, p in (("purge reply p50 ms", 50), ("purge reply p99 ms", 99), ("purge reply max ms", 100)):
            target = f"<= {TARGET_MS:.0f} ms" if p == 100 else ""
            print(f"| {label} | {pct(baseline.latencies, p):.1f} | {pct(load.latencies, p):.1f} | {target} |")
        def over(samples: Samples) -> str:
            return f"{len(samples.latencies)} ({sum(1 for s in samples.latencies if s * 1000 > TARGET_MS)})"

        print(f"| purges (over {TARGET_MS:.0f} ms) | {over(baseline)} | {over(load)} | 0 over |")
        print(f"| purge outcomes | {outcomes(baseline.outcomes)} | {outcomes(load.outcomes)} | all ok |")
        print(f"| /healthz p50 / max ms | | {pct(healthz.latencies, 50):.1f} / {pct(healthz.latencies, 100):.1f} | |")
        print(f"| /healthz outcomes | | {outcomes(healthz.outcomes)} | |")
        print(
            f"| recache POSTs of {BATCH:,} URLs | | {sum(recaches.outcomes.values())} ({outcomes(recaches.outcomes)}), "
            f"mean {mean_ms(recaches):.0f} ms, max {pct(recaches.latencies, 100):.0f} ms | all 200 |"
        )
        print(
            f"| queue listings of {args.entries:,} entries | | "
            f"{sum(listings.outcomes.values())} ({outcomes(listings.outcomes)}), "
            f"mean {mean_ms(listings):.0f} ms, max {pct(listings.latencies, 100):.0f} ms | all 200 |"
        )
        print()

        reasons = []
        worst = pct(load.latencies, 100)
        if not load.latencies or not worst <= TARGET_MS:
            reasons.append(f"purge max {worst:.1f} ms > {TARGET_MS:.0f} ms")
        if set(load.outcomes) - {"ok"}:
            reasons.append(f"purges not answered Purge: Success ({outcomes(load.outcomes)})")
        if not listings.outcomes or set(listings.outcomes) - {"200"}:
            reasons.append(f"listings not all 200 ({outcomes(listings.outcomes)})")
        if not recaches.outcomes or set(recaches.outcomes) - {"200"}:
            reasons.append(f"recache POSTs not all 200 ({outcomes(recaches.outcomes)})")
        if reasons:
            print("TARGET MISSED: " + "; ".join(reasons))
        else:
            print(f"TARGET MET: purge max {worst:.1f} ms <= {TARGET_MS:.0f} ms under load "
                  f"(baseline max {pct(baseline.latencies, 100):.1f} ms), every listing and recache answered 200")
        print(f"total run time {time.monotonic() - run_started:.1f} s")
    finally:
        stop.set()
        if purger is not None:
            purger.stop_event.set()
        if daemon is not None:
            daemon.stop()
            if os.environ.get("BENCH_KEEP_LOG"):
                shutil.copy(daemon.log_path, os.environ["BENCH_KEEP_LOG"])
        redis.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
