"""An Edge Gateway that misbehaves on the body, for fault tests: a real twisted.web server in its own process.

Registered in ``registry:eg:*`` (and publishing its Render Service) as ``harness.fake_eg`` does, it
answers ``POST /internal/cache/recache`` in one of two ways:

- ``stall``: the status line, headers (``Content-Length: 10000``) and 1 KiB of body, then nothing,
  ever: only the client can end the exchange, by closing the connection.
- ``huge``: a 200 whose body of ``--size-mb`` MiB is streamed as the connection takes it (a pull
  producer: the gateway holds one 64 KiB chunk, not the body).

It counts the TCP connections open to it (``GET /stats``: ``open_connections``, ``requests``,
``body_bytes_sent``, ``completed``), so a test can see whether a client closed its side.
``SlowGateway`` starts one in a subprocess; the server itself runs as

    python -m harness.slow_gateway --port P --redis 127.0.0.1:6379 --mode stall

Importing this module installs no reactor (txredisapi would): the server's imports wait for ``main()``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from twisted.internet import task
from twisted.protocols.policies import WrappingFactory
from twisted.web import resource, server

from harness.daemon import free_port
from harness.fake_eg import GatewayProcess, now_rfc3339

CHUNK = b"x" * 65536
STALL_LENGTH = 10_000  # within the dispatcher's body limit: it must wait for the rest


class SlowGateway(GatewayProcess):
    """A misbehaving gateway in its own process, on a free port; ``stats()["open_connections"]`` does not
    count the connection that asks."""

    def __init__(self, redis_addr: str, mode: str, *args: str, eg_id: str = "slow-eg-1") -> None:
        super().__init__("harness.slow_gateway", free_port(), "slow gateway",
                         "--redis", redis_addr, "--mode", mode, "--eg-id", eg_id, *args)



class _Body:
    """A pull producer writing *size* bytes of body to *request*, one chunk each time the transport asks."""

    def __init__(self, request: server.Request, size: int, gateway: Gateway) -> None:
        self.request = request
        self.left = size
        self.gateway = gateway

    def resumeProducing(self) -> None:
        if self.left <= 0 or self.request._disconnected:
            return
        chunk = CHUNK[: min(len(CHUNK), self.left)]
        self.left -= len(chunk)
        self.gateway.body_bytes_sent += len(chunk)
        self.request.write(chunk)
        if self.left <= 0:
            self.request.unregisterProducer()
            self.request.finish()
            self.gateway.completed += 1

    def stopProducing(self) -> None:
        self.left = 0


class Gateway(resource.Resource):
    isLeaf = True

    def __init__(self, args: argparse.Namespace, reactor: Any, redis: Any) -> None:
        super().__init__()
        self.args = args
        self.redis = redis
        self.factory: WrappingFactory | None = None
        self.requests = 0
        self.completed = 0
        self.body_bytes_sent = 0
        self.heartbeat = task.LoopingCall(self.beat)
        self.heartbeat.clock = reactor
        self.heartbeat.start(1.0)

    def beat(self) -> None:
        info = {"eg_id": self.args.eg_id, "address": f"127.0.0.1:{self.args.port}",
                "last_heartbeat": now_rfc3339(), "sharding_enabled": True}
        self.redis.set(f"registry:eg:{self.args.eg_id}", json.dumps(info), expire=3)
        rs = {"id": self.args.rs_id, "address": "127.0.0.1", "port": 8080, "capacity": self.args.capacity,
              "load": 0, "last_seen": now_rfc3339()}
        self.redis.set(f"service:render:{self.args.rs_id}", json.dumps(rs), expire=3)

    def render_GET(self, request: server.Request) -> bytes:
        if request.path != b"/stats":
            request.setResponseCode(404)
            return b"{}"
        open_connections = len(self.factory.protocols) - 1 if self.factory is not None else 0
        return json.dumps({"open_connections": open_connections, "requests": self.requests,
                           "completed": self.completed, "body_bytes_sent": self.body_bytes_sent}).encode()

    def render_POST(self, request: server.Request) -> bytes | int:
        if request.path != b"/internal/cache/recache":
            request.setResponseCode(404)
            return b"{}"
        request.content.read()
        self.requests += 1
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        if self.args.mode == "stall":
            request.setHeader(b"content-length", str(STALL_LENGTH).encode())
            request.write(CHUNK[:1024])
            self.body_bytes_sent += 1024
            return server.NOT_DONE_YET
        size = self.args.size_mb * 1024 * 1024
        request.setHeader(b"content-length", str(size).encode())
        request.registerProducer(_Body(request, size, self), False)
        return server.NOT_DONE_YET


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--mode", choices=["stall", "huge"], required=True)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--eg-id", default="slow-eg-1")
    parser.add_argument("--rs-id", default="slow-rs-1")
    parser.add_argument("--capacity", type=int, default=100)
    args = parser.parse_args()
    import txredisapi
    from twisted.internet import reactor

    host, port = args.redis.rsplit(":", 1)
    gateway = Gateway(args, reactor, txredisapi.lazyConnection(host, port=int(port)))
    site = server.Site(gateway)
    site.noisy = False
    gateway.factory = WrappingFactory(site)
    reactor.listenTCP(args.port, gateway.factory, interface="127.0.0.1", backlog=1024)
    reactor.run()


if __name__ == "__main__":
    main()
