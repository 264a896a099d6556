"""Debian's nginx with FastCGI cache zones in front of :class:`~harness.fastcgi.FastCGIServer`, and the
cachesvc daemon beside it: one stack for the nginx end-to-end tests and benchmarks.

Each :class:`Site` is a ``server`` block with a cache zone of its own at ``<root>/<host>``
(``levels=1:2``, key ``$scheme$request_method$host$request_uri``, 200s fresh for an hour) and, in the
daemon's config, a ``purge.zones`` entry for that directory. Responses carry
``X-Cache-Status: $upstream_cache_status``.
"""

from __future__ import annotations

import http.client
import os
import pwd
import re
import shutil
import struct
import subprocess
import tempfile
import textwrap
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cachesvc.purge.zones import cache_file
from harness.daemon import Daemon, free_port, purge, wait_until
from harness.fastcgi import FastCGIServer

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
OK = b"Purge: Success\n"
ERROR = b"Purge: Error\n"

CONFIG = """
worker_processes 1;
daemon off;
master_process on;
{user}
error_log {base}/error.log info;
pid {base}/nginx.pid;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {base}/tmp/body;
    fastcgi_temp_path {base}/tmp/fastcgi;
    proxy_temp_path {base}/tmp/proxy;
    uwsgi_temp_path {base}/tmp/uwsgi;
    scgi_temp_path {base}/tmp/scgi;
    fastcgi_cache_key "$scheme$request_method$host$request_uri";
{zones}
{servers}
}}
"""

ZONE = "    fastcgi_cache_path {root}/{host} levels=1:2 keys_zone={name}:{size} use_temp_path={temp};\n"

SERVER = """
    server {{
        listen 127.0.0.1:{port};
        server_name {host};
        location / {{
            fastcgi_pass 127.0.0.1:{fcgi};
            fastcgi_param REQUEST_URI $request_uri;
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_cache {name};
            fastcgi_cache_valid 200 60m;
{stale}            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
"""

STALE = "            fastcgi_cache_use_stale updating;\n            fastcgi_cache_background_update on;\n"


@dataclass(frozen=True)
class Site:
    """One nginx ``server`` with its cache zone at ``<root>/<host>``.

    *stale*: ``fastcgi_cache_use_stale updating`` and ``fastcgi_cache_background_update on``;
    *use_temp_path*: the zone's ``use_temp_path``; *mode*: the daemon zone's ``mode:`` (None: unset);
    *keys_zone*: the shared-memory size (about 8,000 keys a megabyte).
    """

    host: str
    stale: bool = False
    use_temp_path: bool = True
    mode: str | None = None
    keys_zone: str = "1m"


# --- the cache file format (../shared/specs/nginx-cache-file.md) -------------------------------------

HEADER = struct.Struct("<QqqqqqIHHHB128sB128s16s4x")  # ngx_http_file_cache_header_t, version 5: 336 bytes
assert HEADER.size == 336


def entry_bytes(
    key: str,
    body: bytes = b"<html>cached</html>",
    valid_sec: int | None = None,
    date: int | None = None,
    version: int = 5,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A cache file as nginx writes it: the v5 header, ``\\nKEY: <key>\\n``, the FastCGI response, the body."""
    now = int(time.time())
    key_line = b"\nKEY: " + key.encode() + b"\n"
    response = b"Status: 200 OK\r\nContent-Type: text/html\r\n"
    response += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers) + b"\r\n"
    header_start = HEADER.size + len(key_line)
    valid, date = now + 3600 if valid_sec is None else valid_sec, now if date is None else date
    body_start, crc = header_start + len(response), zlib.crc32(key.encode())
    fields = (version, valid, 0, 0, -1, date, crc, 0, header_start, body_start, 0, b"", 0, b"", b"")
    header = HEADER.pack(*fields)
    return header + key_line + response + body


def valid_sec(path: Path | str) -> int:
    """The entry's ``valid_sec`` (offset 8), read without following a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return int(struct.unpack("<q", os.pread(fd, 8, 8))[0])
    finally:
        os.close(fd)


def set_valid_sec(path: Path | str, when: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.pwrite(fd, struct.pack("<q", when), 8)
    finally:
        os.close(fd)


def is_fresh(path: Path | str) -> bool:
    """True if *path* is a cache file nginx would serve as a HIT now."""
    try:
        return valid_sec(path) >= time.time()
    except OSError:
        return False


def page_number(body: str) -> int:
    """Which answer of the origin for its URL a page is (the ``#N`` FastCGIServer writes)."""
    match = re.search(r"#(\d+)</html>", body)
    assert match, f"not a page of the test origin: {body[:200]!r}"
    return int(match.group(1))


def page_on_disk(path: Path | str) -> int | None:
    """The page number (``#N``) of the body a cache file holds, if it exists and is fresh; else None.
    (Inode numbers cannot tell a new entry from an old one: a deleted file's is soon reused.)"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        data = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    if len(data) < HEADER.size or struct.unpack_from("<q", data, 8)[0] < time.time():
        return None
    match = re.search(rb"#(\d+)</html>", data)
    return int(match.group(1)) if match else None


def cache_files(zone: Path) -> list[Path]:
    """Every finished cache entry (32 hex digits) under *zone*."""
    return [p for p in zone.rglob("*") if len(p.name) == 32 and p.is_file()]


# --- the stack ----------------------------------------------------------------------------------------


def _worker() -> tuple[int, int] | None:
    """(uid, gid) of the user nginx's workers run as: www-data when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("www-data")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _indent(yaml: str) -> str:
    return textwrap.indent(textwrap.dedent(yaml).strip("\n"), "  ") + "\n" if yaml.strip() else ""


class Stack:
    """nginx on a free port, a FastCGI origin, and (unless *daemon* is False) ``twistd cachesvc``.

    *purge_yaml* goes under ``purge:`` in the daemon's config (any indentation; ``{origin}`` becomes
    ``http://127.0.0.1:<nginx port>``, where warm requests go). Use as a context manager, or call
    :meth:`close`.
    """

    def __init__(
        self,
        sites: Sequence[Site],
        purge_yaml: str = "",
        fcgi: FastCGIServer | None = None,
        daemon: bool = True,
        connections: int = 1024,
    ) -> None:
        self.sites = {site.host: site for site in sites}
        self.base = Path(tempfile.mkdtemp(prefix="cachesvc-nginx-"))
        os.chmod(self.base, 0o755)
        self.root = self.base / "cache"
        self.root.mkdir(mode=0o755)
        (self.base / "tmp").mkdir(mode=0o755)
        self.fcgi = fcgi or FastCGIServer()
        self.web_port, self.purge_port = free_port(), free_port()
        self.origin = f"http://127.0.0.1:{self.web_port}"
        self.daemon: Daemon | None = None
        self.daemon_yaml: str | None = None
        self.worker = _worker()
        self.nginx: subprocess.Popen[bytes] | None = None
        try:
            self._start_nginx(connections)
            if daemon:
                self.start_daemon(purge_yaml)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _start_nginx(self, connections: int) -> None:
        user = "user www-data;" if self.worker else ""
        zones, servers = "", ""
        for i, site in enumerate(self.sites.values()):
            name, temp = f"zone{i}", "on" if site.use_temp_path else "off"
            zones += ZONE.format(root=self.root, host=site.host, name=name, size=site.keys_zone, temp=temp)
            servers += SERVER.format(
                port=self.web_port, host=site.host, fcgi=self.fcgi.port, name=name, stale=STALE if site.stale else ""
            )
        conf = self.base / "nginx.conf"
        conf.write_text(CONFIG.format(user=user, base=self.base, connections=connections, zones=zones, servers=servers))
        self.nginx = subprocess.Popen([NGINX, "-p", str(self.base), "-c", str(conf)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket_probe = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=2)
                socket_probe.connect()
                socket_probe.close()
                return
            except OSError:
                if self.nginx.poll() is not None:
                    err = self.nginx.stderr.read().decode() if self.nginx.stderr else ""
                    raise AssertionError(f"nginx exited with {self.nginx.returncode}: {err}") from None
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)

    def daemon_config(self, purge_yaml: str = "") -> str:
        zones = ""
        for site in self.sites.values():
            zones += f"    - hosts: [{site.host}]\n      path: {self.root}/{site.host}\n"
            if site.mode is not None:
                zones += f"      mode: {site.mode}\n"
        return (
            f"purge:\n  listen: tcp:{self.purge_port}:interface=127.0.0.1\n  roots: [{self.root}]\n"
            f"  zones:\n{zones}" + _indent(purge_yaml.replace("{origin}", self.origin))
        )

    def start_daemon(self, purge_yaml: str = "") -> Daemon:
        """(Re)start the daemon with *purge_yaml* under ``purge:``; it listens on the same port."""
        self.stop_daemon()
        conf = self.base / f"cachesvc-{time.monotonic_ns()}.yaml"
        conf.write_text(self.daemon_config(purge_yaml))
        self.daemon = Daemon(["--config", str(conf)], self.base)
        self.daemon_yaml = purge_yaml
        self.daemon.wait_for_port(self.purge_port)
        return self.daemon

    def use_daemon(self, purge_yaml: str = "") -> Daemon:
        """The running daemon if it runs with *purge_yaml*, else one restarted with it."""
        if self.daemon is None or self.daemon.proc.poll() is not None or self.daemon_yaml != purge_yaml:
            return self.start_daemon(purge_yaml)
        return self.daemon

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    @property
    def log(self) -> str:
        """The running daemon's log so far."""
        return self.daemon.log if self.daemon is not None else ""

    def nginx_log(self) -> str:
        path = self.base / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, lines: int = 30) -> str:
        """The tails of the daemon's and nginx's logs, for an assertion message."""
        daemon = "\n".join(self.log.splitlines()[-lines:])
        quiet = ("[notice]", "[info]", "[debug]")
        nginx = "\n".join([x for x in self.nginx_log().splitlines() if not any(q in x for q in quiet)][-lines:])
        return f"\n--- daemon log (tail) ---\n{daemon}\n--- nginx error log (tail) ---\n{nginx}"

    def wait(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        """:func:`harness.daemon.wait_until`, failing with the logs' tails."""
        try:
            return wait_until(check, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}{self.logs()}") from None

    def close(self) -> None:
        try:
            self.stop_daemon()
        finally:
            if self.nginx is not None and self.nginx.poll() is None:
                self.nginx.terminate()
                try:
                    self.nginx.wait(10)
                except subprocess.TimeoutExpired:
                    self.nginx.kill()
                    self.nginx.wait(5)
            self.fcgi.close()
            shutil.rmtree(self.base, ignore_errors=True)

    # --- talking to it -------------------------------------------------------------------------

    def get(self, host: str, path: str, headers: dict[str, str] | None = None) -> tuple[str, str]:
        """One GET through nginx: (``X-Cache-Status``, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=30)
        try:
            conn.request("GET", path, headers={"Host": host, **(headers or {})})
            response = conn.getresponse()
            body = response.read().decode(errors="replace")
            assert response.status == 200, f"{host}{path}: {response.status} {body[:200]}"
            return response.getheader("X-Cache-Status") or "", body
        finally:
            conn.close()

    def status(self, host: str, path: str) -> str:
        return self.get(host, path)[0]

    def until_hit(self, host: str, path: str, timeout: float = 10.0) -> str:
        """GET until nginx answers from the cache (HIT); the body it served."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.get(host, path)
            if status == "HIT":
                return body
            assert time.monotonic() < deadline, f"{host}{path} never became a HIT (last: {status!r})"
            time.sleep(0.05)

    def file(self, host: str, path: str, method: str = "GET", scheme: str = "http") -> Path:
        """Where nginx keeps the entry of *path* (as cachesvc.purge.zones computes it)."""
        return Path(cache_file(str(self.zone(host)), (1, 2), f"{scheme}{method}{host}{path}"))

    def zone(self, host: str) -> Path:
        return self.root / host

    def dirs(self, directory: Path) -> Path:
        """Make *directory* (below the root) and its parents as nginx's worker would (0700, its owner)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.worker:
            parent = directory
            while parent != self.root and parent.is_relative_to(self.root):
                os.chown(parent, *self.worker)
                parent = parent.parent
        return directory

    def plant(self, path: Path, content: bytes) -> Path:
        """Write *path* below a zone as nginx's worker would own it (directories 0700, the file 0600), so
        that nginx can still cache beside it."""
        self.dirs(path.parent)
        path.write_bytes(content)
        os.chmod(path, 0o600)
        if self.worker:
            os.chown(path, *self.worker)
        return path

    def purge(self, line: str | bytes) -> bytes:
        """One purge line (a newline added if missing), as the SpinupWP client sends it; the reply."""
        data = line.encode() if isinstance(line, str) else line
        return purge(self.purge_port, data if data.endswith(b"\n") else data + b"\n", timeout=60)

    def wait_fresh(self, host: str, path: str, timeout: float = 10.0) -> Path:
        """Wait until the entry of *path* is fresh on disk (a background update or a warm-up finished:
        nginx replaced the file by one whose valid_sec is in the future), without a request."""
        target = self.file(host, path)
        self.wait(lambda: is_fresh(target), timeout, f"{host}{path} fresh on disk")
        return target

    def wait_all_fresh(self, host: str, paths: Sequence[str], timeout: float = 30.0) -> None:
        targets = [self.file(host, p) for p in paths]
        self.wait(lambda: all(is_fresh(t) for t in targets), timeout, f"{len(paths)} entries of {host} fresh")
