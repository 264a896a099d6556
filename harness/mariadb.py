"""A MariaDB server of the tests' own: ``mariadb-install-db`` into a temporary data directory, then
``mariadbd`` on a free loopback port (about a second in all), so no test depends on a server the machine
may or may not run, or touches its data. ``root`` has no password and is reached over TCP.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from harness.daemon import free_port

MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
CLIENT = shutil.which("mariadb") or "/usr/bin/mariadb"

# Small and fast: a throwaway server for a few dozen rows.
SERVER_OPTIONS = [
    "--innodb-log-file-size=4M",
    "--innodb-data-file-path=ibdata1:4M:autoextend",
    "--innodb-buffer-pool-size=32M",
    "--innodb-flush-log-at-trx-commit=0",
    "--skip-log-bin",
    "--skip-name-resolve",
]


def available() -> bool:
    return all(os.access(p, os.X_OK) for p in (MARIADBD, INSTALL_DB, CLIENT))


class MariaDB:
    """``mariadbd --no-defaults`` on 127.0.0.1:<free port>, its data below a temporary directory."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="cachesvc-mariadb-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        as_user = ["--user=root"] if os.geteuid() == 0 else []  # mariadbd refuses root unless told
        try:
            subprocess.run(
                [INSTALL_DB, "--no-defaults", f"--datadir={self.base}/data", "--auth-root-authentication-method=normal",
                 "--skip-test-db", *as_user, *SERVER_OPTIONS],
                check=True, capture_output=True, timeout=60,
            )
            self.proc = subprocess.Popen(
                [MARIADBD, "--no-defaults", *as_user, f"--datadir={self.base}/data", f"--port={self.port}",
                 "--bind-address=127.0.0.1", f"--socket={self.base}/mysqld.sock", f"--pid-file={self.base}/mysqld.pid",
                 f"--log-error={self.base}/error.log", f"--tmpdir={self.base}", *SERVER_OPTIONS],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            self._wait()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> MariaDB:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def host(self) -> str:
        """``host:port`` as WordPress's DB_HOST takes it."""
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.base / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"mariadbd exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                self.sql("SELECT 1")
                return
            except (OSError, subprocess.CalledProcessError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"mariadbd did not answer within {timeout}s:\n{self.log()[-3000:]}") from None
                time.sleep(0.05)

    def sql(self, statement: str) -> str:
        """One statement through the ``mariadb`` client, as root over TCP; its tab-separated output."""
        done = subprocess.run(
            [CLIENT, "--no-defaults", "-h127.0.0.1", f"-P{self.port}", "-uroot", "-N", "-B", "-e", statement],
            check=True, capture_output=True, text=True, timeout=30,
        )
        return done.stdout

    def create_database(self, name: str) -> None:
        self.sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
