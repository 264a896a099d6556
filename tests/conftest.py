from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from harness.daemon import Daemon, free_port


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every log line emitted in this process during the test, formatted."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    root.mkdir()
    return root


@pytest.fixture
def purge_daemon(tmp_path: Path, cache_root: Path) -> Iterator[tuple[Daemon, int]]:
    """A purge daemon started with command-line options only, on a free port."""
    port = free_port()
    daemon = Daemon(["--cache-root", str(cache_root), "--purge-listen", f"tcp:{port}:interface=127.0.0.1"], tmp_path)
    try:
        daemon.wait_for_port(port)
        yield daemon, port
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server for the whole run, started on a free port."""
    from harness.redis_server import RedisServer

    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis(redis_server):
    """A client of the suite's Redis, flushed before each test."""
    import redis as redis_py

    if redis_server.proc is None:
        redis_server.start()
    client = redis_py.Redis(host="127.0.0.1", port=redis_server.port)
    client.flushall()
    yield client
    client.close()
