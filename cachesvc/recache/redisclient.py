"""Redis with a deadline on every call, and Lua scripts sent by hash.

txredisapi, with ``reconnect=True``, queues a command issued while Redis is down and waits forever;
here every call is bounded by a timeout and fails with :class:`RedisUnavailable`, so callers (API
handlers, the scheduler) can answer or skip instead of hanging. Replies are bytes
(``charset=None``): queue members must come back exactly as stored.

Scripts are package files (``lua/*.lua``) sent with ``EVALSHA``; a Redis that does not know one
yet (new, restarted, flushed) answers ``NOSCRIPT`` and gets the text once with ``EVAL``.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cachesvc.metrics import Metrics


class RedisUnavailable(Exception):
    """Redis did not answer in time or the connection is down."""


class RedisError(Exception):
    """Redis answered with an error (``BUSY``, ``WRONGTYPE``, a script error…)."""


class Script:
    """A Lua script of the package's ``lua/`` folder, read once, named by its SHA-1."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.text = resources.files("cachesvc.recache").joinpath("lua", f"{name}.lua").read_bytes()
        self.sha = hashlib.sha1(self.text).hexdigest()

    def __repr__(self) -> str:
        return f"<Script {self.name}>"


class RedisClient(Service):
    """The one connection pool to Redis; closed when the service stops."""

    log = Logger()
    name = "redis"

    def __init__(
        self, addr: str, password: str, db: int, reactor: Any, timeout: float = 3.0, metrics: Metrics | None = None
    ) -> None:
        host, _, port = addr.rpartition(":")
        self._metrics = metrics
        self.addr = addr
        self.timeout = timeout
        self._reactor = reactor
        self._pool = txredisapi.lazyConnectionPool(
            host or "localhost",
            int(port or 6379),
            dbid=db,
            poolsize=4,
            reconnect=True,
            charset=None,
            password=password or None,
            convertNumbers=False,
            connectTimeout=timeout,
            replyTimeout=timeout,
        )

    def call(self, command: str, *args: Any) -> Deferred[Any]:
        d = maybeDeferred(self._pool.execute_command, command, *args)
        return self._bounded(d, command)

    def run(self, script: Script, keys: list[Any], args: list[Any]) -> Deferred[Any]:
        """Run *script* with *keys* and *args*; one round trip, two the first time a Redis sees it."""
        d = self.call("EVALSHA", script.sha, len(keys), *keys, *args)

        def unknown(failure: Failure) -> Any:
            failure.trap(RedisError)
            if not str(failure.value).startswith("NOSCRIPT"):
                return failure
            return self.call("EVAL", script.text, len(keys), *keys, *args)

        d.addErrback(unknown)
        return d

    def _bounded(self, d: Deferred[Any], command: str) -> Deferred[Any]:
        d.addTimeout(self.timeout, self._reactor)
        d.addErrback(self._translate, command)
        if self._metrics is not None:
            counter = self._metrics.redis_operations

            def ok(result: Any) -> Any:
                counter.labels(command.lower(), "ok").inc()
                return result

            def error(failure: Failure) -> Failure:
                counter.labels(command.lower(), "error").inc()
                return failure

            d.addCallbacks(ok, error)
        return d

    def _translate(self, failure: Failure, command: str) -> Failure:
        if failure.check(txredisapi.ResponseError, txredisapi.ScriptDoesNotExist):
            raise RedisError(str(failure.value))
        if failure.check(TimeoutError, txredisapi.TimeoutError, txredisapi.ConnectionError, ConnectionError):
            raise RedisUnavailable(f"Redis at {self.addr} did not answer {command} within {self.timeout:g}s")
        return failure

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        return maybeDeferred(self._pool.disconnect)
