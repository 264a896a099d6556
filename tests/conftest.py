from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.daemon import Daemon, free_port


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
