"""Cache Daemon API figures, each beside its reference.

recache     One request of 10,000 URLs (all 3 recache dimensions: 30,000 queue entries): time, and the
            Redis commands it cost (from Redis's own counter).
invalidate  One request of 10,000 URLs (30,000 metadata keys, all present): time and Redis commands.
status      GET /status requests per second with 16 concurrent keep-alive clients, against a minimal
            twisted.web server in its own process that answers the same path with a constant body.

    .venv/bin/python bench/api_bench.py
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cachesvc.recache.urlnorm import normalize, url_hash  # noqa: E402
from harness.daemon import Daemon, free_port  # noqa: E402
from harness.redis_server import RedisServer  # noqa: E402

KEY = "bench-key"
CEILING = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from twisted.web import resource, server

    class Status(resource.Resource):
        isLeaf = True
        def render_GET(self, request):
            request.setHeader(b"content-type", b"application/json")
            return b'{"daemon":{},"internal_queue":{},"rs_capacity":{},"queues":{}}'

    site = server.Site(Status())
    site.noisy = False
    reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
    reactor.run()
    """
)


CLIENT_COMMANDS = ("eval", "evalsha", "scan", "mget", "zrange", "ping", "get", "script")


def counters(redis_port: int) -> tuple[int, int]:
    """(round trips: top-level commands this daemon sends, all commands Redis ran, scripts' included)."""
    import socket

    with socket.create_connection(("127.0.0.1", redis_port)) as s:
        s.sendall(b"INFO commandstats\r\n")
        data = b""
        while not data.endswith(b"\r\n\r\n") and not data.endswith(b"\r\n"):
            data += s.recv(65536)
        while b"cmdstat" in data and not data.rstrip().endswith(b"=0"):
            s.settimeout(0.2)
            try:
                more = s.recv(65536)
            except OSError:
                break
            if not more:
                break
            data += more
    trips = total = 0
    for line in data.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_"):].partition(":")
            calls = int(fields.split(",")[0].split("=")[1])
            if name == "info":
                continue
            total += calls
            if name in CLIENT_COMMANDS:
                trips += calls
    return trips, total


def post(port: int, path: str, body: dict) -> tuple[int, dict, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    raw = json.dumps(body).encode()
    started = time.perf_counter()
    conn.request("POST", path, body=raw, headers={"X-Internal-Auth": KEY})
    response = conn.getresponse()
    data = json.loads(response.read())
    elapsed = time.perf_counter() - started
    conn.close()
    return response.status, data, elapsed


def rate(port: int, path: str, clients: int, seconds: float, auth: bool) -> float:
    done = [0] * clients
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"X-Internal-Auth": KEY} if auth else {}
        while time.monotonic() < stop:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            done[i] += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - started)


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="cachesvc-apibench-"))
    redis = RedisServer()
    redis.start()
    port, ceiling_port = free_port(), free_port()
    (base / "hosts.yaml").write_text(
        "hosts:\n  - id: 1\n    domain: bench.example.com\n"
        "    dimensions:\n      desktop: {id: 1}\n      mobile: {id: 2}\n"
    )
    (base / "eg.yaml").write_text(f"internal: {{auth_key: {KEY}}}\nhosts: {{include: hosts.yaml}}\n")
    (base / "cd.yaml").write_text(
        f"eg_config: eg.yaml\ndaemon_id: bench\nredis: {{addr: '{redis.addr}'}}\n"
        f"http_api: {{listen: '127.0.0.1:{port}', request_timeout: 60s, max_body_size: 16000000}}\n"
    )
    daemon = Daemon(["--config", str(base / "cd.yaml")], base)
    ceiling = subprocess.Popen([sys.executable, "-c", CEILING, str(ceiling_port)])
    try:
        daemon.wait_for_port(port)
        urls = [f"https://bench.example.com/post/{i}?utm=x&b={i}" for i in range(10000)]
        print(f"API benchmark on {sys.platform}, cachesvc against its own redis-server {redis.addr}")

        trips, total = counters(redis.port)
        status, data, seconds = post(
            port, "/internal/cache/recache", {"host_id": 1, "urls": urls, "priority": "normal"}
        )
        trips2, total2 = counters(redis.port)
        assert status == 200 and data["data"]["entries_enqueued"] == 30000, data
        print(f"recache of 10,000 URLs x 3 dimensions (30,000 entries): {seconds * 1000:.0f} ms, "
              f"{trips2 - trips} Redis round trip(s), {total2 - total} commands run inside Redis")

        import redis as redis_py

        client = redis_py.Redis(port=redis.port)
        pipe = client.pipeline()
        for url in urls:
            h = url_hash(normalize(url))
            for dim in (0, 1, 2):
                pipe.hset(f"meta:cache:1:{dim}:{h}", "url", url)
        pipe.execute()
        trips, total = counters(redis.port)
        status, data, seconds = post(port, "/internal/cache/invalidate", {"host_id": 1, "urls": urls})
        trips2, total2 = counters(redis.port)
        assert status == 200 and data["data"]["entries_invalidated"] == 30000, data
        print(f"invalidate of 10,000 URLs x 3 dimensions (30,000 keys): {seconds * 1000:.0f} ms, "
              f"{trips2 - trips} Redis round trip(s), {total2 - total} commands run inside Redis")

        rate(port, "/status", 4, 0.5, True)  # warm-up
        ours = rate(port, "/status", 16, 5.0, True)
        base_rate = rate(ceiling_port, "/status", 16, 5.0, False)
        print(f"GET /status, 16 keep-alive clients, 5 s: {ours:.0f} req/s; minimal twisted.web constant reply: "
              f"{base_rate:.0f} req/s; ratio {ours / base_rate:.2f}")
    finally:
        daemon.stop()
        ceiling.terminate()
        ceiling.wait()
        redis.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
