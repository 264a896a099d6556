"""A fake Edge Gateway for tests and benchmarks: a real twisted.web server in its own process.

It answers ``POST /internal/cache/recache`` as told (200, any status, failing the first N attempts
of each URL, slowly, with a random part added to each delay (``jitter``), or never), records every
request as a JSON line, registers itself in ``registry:eg:*`` as an EG does, and plays its Render
Service: ``service:render:{id}`` is written as the RS writes it (spec 1.4), with ``load`` raised
while a request is "rendering", so a scheduler's use of capacity can be checked end to end.
``GET /stats`` reports counts and the peak of concurrent renders; ``POST /control`` changes the
behaviour at run time, the online load (``base_load``) included, published at once as the RS
publishes every change.

``FakeEG`` starts one in a subprocess and reads what it recorded; the server itself runs as

    python -m harness.fake_eg --port P --redis 127.0.0.1:6379 --log eg.jsonl [--delay 0.2] [--status 500]

Importing this module installs no reactor (txredisapi would): the server's imports wait for ``main()``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.web import resource, server

from harness.daemon import TOP, free_port, wait_until


class GatewayProcess:
    """A test gateway run as ``python -m MODULE --port PORT ...`` from the repo root, up once ``/stats`` answers."""

    def __init__(self, module: str, port: int, what: str, *args: str) -> None:
        self.port, self.what = port, what
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--port", str(port), *args],
            cwd=TOP, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self._up, 10, f"{what} listening")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.what} exited with {self.proc.returncode}")
        try:
            self.stats()
            return True
        except OSError:
            return False

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class FakeEG(GatewayProcess):
    """A fake gateway in its own process, on a free port, recording to ``{base}/{eg_id}-{port}.jsonl``."""

    def __init__(self, base: Path, redis_addr: str, *args: str, eg_id: str = "test-eg-1") -> None:
        port = free_port()
        self.log = base / f"{eg_id}-{port}.jsonl"
        self.log.touch()
        super().__init__("harness.fake_eg", port, "fake EG",
                         "--redis", redis_addr, "--log", str(self.log), "--eg-id", eg_id, *args)

    def control(self, **mode: Any) -> None:
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{self.port}/control", data=json.dumps(mode).encode()), timeout=5
        ).read()

    def events(self, kind: str = "start") -> list[dict[str, Any]]:
        # The gateway may be writing a line right now: only complete lines count.
        lines = self.log.read_text().split("\n")[:-1]
        return [e for e in map(json.loads, lines) if e["event"] == kind]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


class Gateway(resource.Resource):
    """The server side: what runs in the subprocess."""

    isLeaf = True

    def __init__(self, args: argparse.Namespace, reactor: Any, redis: Any) -> None:
        super().__init__()
        self.args = args
        self.reactor = reactor
        self.log = open(args.log, "a", buffering=1)  # noqa: SIM115 -- open for the gateway process's life
        self.redis = redis
        self.mode = {"status": args.status, "delay": args.delay, "fail_first": args.fail_first, "hang": args.hang,
                     "jitter": args.jitter, "base_load": args.base_load}
        self.load = 0
        self.peak = 0
        self.requests = 0
        self.answered = 0
        self.first_request: float | None = None
        self.last_answer: float | None = None
        self.attempts: Counter[str] = Counter()
        self.active: Counter[str] = Counter()
        self.duplicates = 0
        self.heartbeat = task.LoopingCall(self.beat)
        self.heartbeat.clock = reactor
        self.heartbeat.start(args.heartbeat)

    def beat(self) -> None:
        if self.args.register:
            info = {"eg_id": self.args.eg_id, "address": f"{self.args.address}:{self.args.port}",
                    "last_heartbeat": now_rfc3339(), "sharding_enabled": not self.args.sharding_disabled}
            self.redis.set(f"registry:eg:{self.args.eg_id}", json.dumps(info), expire=3)
        self.write_rs()

    def write_rs(self) -> None:
        if self.args.capacity > 0:
            info = {"id": self.args.rs_id, "address": "127.0.0.1", "port": 8080, "capacity": self.args.capacity,
                    "load": self.load + int(self.mode["base_load"]), "last_seen": now_rfc3339()}
            self.redis.set(f"service:render:{self.args.rs_id}", json.dumps(info), expire=3)

    def render_GET(self, request: server.Request) -> bytes:
        if request.path == b"/stats":
            return json.dumps(
                {
                    "requests": self.requests,
                    "answered": self.answered,
                    "load": self.load,
                    "peak": self.peak,
                    "duplicates_in_flight": self.duplicates,
                    "first_request": self.first_request,
                    "last_answer": self.last_answer,
                }
            ).encode()
        request.setResponseCode(404)
        return b'{"success":false,"message":"not found"}'

    def render_POST(self, request: server.Request) -> bytes | int:
        if request.path == b"/control":
            self.mode.update(json.loads(request.content.read()))
            self.write_rs()
            return b"{}"
        if request.path != b"/internal/cache/recache":
            request.setResponseCode(404)
            return b'{"success":false,"message":"not found"}'
        body = request.content.read()
        self.requests += 1
        if self.first_request is None:
            self.first_request = time.time()
        try:
            decoded = json.loads(body)
            key = f"{decoded.get('host_id')}|{decoded.get('url')}|{decoded.get('dimension_id')}"
        except ValueError:
            decoded, key = None, repr(body)
        self.attempts[key] += 1
        if self.active[key]:
            self.duplicates += 1
        self.active[key] += 1
        self.record("start", request, body, decoded, None)
        if self.mode["hang"]:
            return server.NOT_DONE_YET
        self.load += 1
        self.peak = max(self.peak, self.load)
        self.write_rs()
        delay = float(self.mode["delay"]) + random.random() * float(self.mode["jitter"])
        d: Deferred[None] = task.deferLater(self.reactor, delay, lambda: None)
        d.addCallback(lambda _: self.finish(request, key, body, decoded))
        request.notifyFinish().addErrback(lambda _: None)
        return server.NOT_DONE_YET

    def finish(self, request: server.Request, key: str, body: bytes, decoded: object) -> None:
        self.load -= 1
        self.active[key] -= 1
        self.write_rs()
        status = int(self.mode["status"])
        if self.attempts[key] <= int(self.mode["fail_first"]):
            status = 500
        self.record("end", request, body, decoded, status)
        self.answered += 1
        self.last_answer = time.time()
        if request.finished or request._disconnected:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.write(b'{"success":true}' if status == 200 else b'{"success":false,"message":"failed"}')
        request.finish()

    def record(self, event: str, request: server.Request, body: bytes, decoded: object, status: int | None) -> None:
        headers = {k.decode(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.log.write(
            json.dumps(
                {
                    "t": time.time(),
                    "event": event,
                    "eg": self.args.eg_id,
                    "body": body.decode("utf-8", "replace"),
                    "json": decoded,
                    "headers": headers,
                    "status": status,
                }
            )
            + "\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--eg-id", default="test-eg-1")
    parser.add_argument("--rs-id", default="rs-1")
    parser.add_argument("--address", default="127.0.0.1", help="address to register ('' registers ':port')")
    parser.add_argument("--capacity", type=int, default=100, help="render capacity to publish; 0 = publish no RS")
    parser.add_argument("--base-load", type=int, default=0, help="load from 'online traffic'")
    parser.add_argument("--status", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--jitter", type=float, default=0.0, help="up to this much more delay, at random")
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--register", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sharding-disabled", action="store_true")
    parser.add_argument("--heartbeat", type=float, default=1.0)
    args = parser.parse_args()
    import txredisapi
    from twisted.internet import reactor

    host, port = args.redis.rsplit(":", 1)
    site = server.Site(Gateway(args, reactor, txredisapi.lazyConnection(host, port=int(port))))
    site.noisy = False
    reactor.listenTCP(args.port, site, interface="127.0.0.1", backlog=1024)
    reactor.run()


if __name__ == "__main__":
    main()
