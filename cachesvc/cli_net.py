"""The ``cachesvc`` command's side of the wire: where the daemon listens, and small blocking clients.

A server endpoint string (``tcp:7836:interface=127.0.0.1``, ``unix:/run/cachesvc/purge.sock``)
says where to connect: a wildcard interface is reached on loopback. ``systemd:`` says nothing of
the address; for the purge port the socket unit's ``Listen`` is asked of ``systemctl``, else the
command needs ``--endpoint``. Every socket operation has a timeout: no reactor, nothing to hang.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
"""A scrape: ``{sample name: {sorted label pairs: value}}``."""


class Failed(Exception):
    """The daemon could not be reached, or answered with an error (exit status 1)."""


class NoAddress(Exception):
    """An endpoint the command cannot connect to by itself; the message says what to pass (exit status 2)."""


@dataclass(frozen=True)
class Address:
    """Where to connect: ``(host, port)`` over TCP, or a Unix socket's path."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def connect(self, timeout: float) -> socket.socket:
        try:
            if self.path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                try:
                    sock.connect(self.path)
                except BaseException:
                    sock.close()
                    raise
                return sock
            return socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as e:
            raise Failed(f"cannot connect to {self}: {e.strerror or e}") from None


def split_endpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """``kind:a:b=c`` → kind, positional arguments, keyword arguments, with Twisted's ``\\:`` escapes undone."""
    parts, current, chars = [], [], iter(description)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    kind, positional, keywords = parts[0].strip().lower(), [], {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep:
            keywords[key.strip()] = value
        else:
            positional.append(part)
    return kind, positional, keywords


_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "::0": "::1"}


def client_address(endpoint: str, what: str) -> Address:
    """Where a client reaches the server endpoint *endpoint* (*what*: the setting, for messages)."""
    kind, positional, keywords = split_endpoint(endpoint)
    if kind in ("tcp", "tcp6"):
        port = keywords.get("port", positional[0] if positional else "")
        interface = keywords.get("interface", positional[1] if len(positional) > 1 else "")
        if not port.isdigit():
            raise NoAddress(f"{what} {endpoint!r} has no port")
        host = _LOOPBACK.get(interface, interface) if interface or kind == "tcp" else "::1"
        return Address(host=host, port=int(port))
    if kind == "unix":
        path = keywords.get("address", positional[0] if positional else "")
        if not path:
            raise NoAddress(f"{what} {endpoint!r} has no socket path")
        return Address(path=path)
    raise NoAddress(f"{what} is {endpoint!r}: the command cannot tell where that listens")


def parse_address(text: str) -> Address:
    """An ``--endpoint``/``--api`` value: ``HOST:PORT``, ``PORT``, a socket path, or an endpoint string."""
    if text.startswith(("tcp:", "tcp6:", "unix:")):
        return client_address(text, "the endpoint")
    if text.startswith("/"):
        return Address(path=text)
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise NoAddress(f"{text!r} is not an address; write HOST:PORT, PORT, a socket path or tcp:PORT:interface=HOST")
    host = host.strip("[]")
    return Address(host=_LOOPBACK.get(host, host), port=int(port))


_LISTEN = re.compile(r"^\s*(\S+)\s+\(Stream\)\s*$")


def socket_unit_address(listen: str) -> Address | None:
    """``systemctl show -p Listen``'s first stream socket (``127.0.0.1:7836 (Stream)``), or ``None``."""
    for line in listen.splitlines():
        match = _LISTEN.match(line.removeprefix("Listen="))
        if match:
            try:
                return parse_address(match.group(1))
            except NoAddress:
                return None
    return None


def from_socket_unit(unit: str = "cachesvc.socket") -> Address | None:
    """The purge socket systemd listens on for the daemon (socket activation), if ``systemctl`` says."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return None
    try:
        done = subprocess.run([systemctl, "show", "--property=Listen", "--value", unit],
                              capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return socket_unit_address(done.stdout) if done.returncode == 0 else None


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = Address(path=self._path).connect(self.timeout or 10.0)


class Http:
    """One keep-alive HTTP connection to *address*, each request bounded by *timeout*."""

    def __init__(self, address: Address, timeout: float, headers: dict[str, str] | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.headers = dict(headers or {})
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.address.path:
                self._conn = _UnixHTTPConnection(self.address.path, self.timeout)
            else:
                self._conn = http.client.HTTPConnection(self.address.host, self.address.port, timeout=self.timeout)
        return self._conn

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        headers = {**self.headers, **({"Content-Type": "application/json"} if data is not None else {})}
        while True:
            reused = self._conn is not None
            conn = self._connection()
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            except Failed:
                self.close()
                raise
            except (OSError, http.client.HTTPException) as e:
                self.close()
                # A kept-alive connection the server closed meanwhile fails before any answer: once more.
                if not (reused and isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError,
                                                  BrokenPipeError))):
                    raise Failed(f"{method} http://{self.address}{path}: {e}") from None

    def json(self, method: str, path: str, body: Any = None) -> Any:
        """The API's envelope: the parsed body of a 2xx answer; :class:`Failed` with its message otherwise."""
        status, raw = self.request(method, path, body)
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        if not 200 <= status < 300:
            message = parsed.get("message") if isinstance(parsed, dict) else raw[:200].decode("utf-8", "replace")
            hint = " (check internal.auth_key in the EG config)" if status == 401 else ""
            raise Failed(f"{method} {path}: HTTP {status}: {message}{hint}")
        if parsed is None:
            raise Failed(f"{method} {path}: the answer is not JSON")
        return parsed

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def scrape(address: Address, path: str, timeout: float) -> Samples:
    """The samples at ``http://address/path``."""
    client = Http(address, timeout)
    try:
        status, raw = client.request("GET", path)
    finally:
        client.close()
    if status != 200:
        raise Failed(f"GET http://{address}{path}: HTTP {status}")
    samples: Samples = {}
    try:
        for family in text_string_to_metric_families(raw.decode("utf-8", "replace")):
            for sample in family.samples:
                samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    except ValueError as e:
        raise Failed(f"GET http://{address}{path}: not a Prometheus exposition ({e})") from None
    return samples
