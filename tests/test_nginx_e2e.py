"""Purges against a real nginx FastCGI cache: after a purge the next request is a MISS, then a HIT again."""

from __future__ import annotations

import http.client
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachesvc.purge.zones import cache_file
from harness.daemon import Daemon, free_port, purge
from harness.fastcgi import FastCGIServer

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
OK = b"Purge: Success\n"

CONFIG = """
worker_processes 1;
daemon off;
master_process on;
{user}
error_log {base}/error.log info;
pid {base}/nginx.pid;
events {{ worker_connections 128; }}
http {{
    access_log off;
    client_body_temp_path {base}/tmp/body;
    fastcgi_temp_path {base}/tmp/fastcgi;
    proxy_temp_path {base}/tmp/proxy;
    uwsgi_temp_path {base}/tmp/uwsgi;
    scgi_temp_path {base}/tmp/scgi;
    fastcgi_cache_key "$scheme$request_method$host$request_uri";
    fastcgi_cache_path {root}/on.example levels=1:2 keys_zone=zone_on:1m use_temp_path=on;
    fastcgi_cache_path {root}/off.example levels=1:2 keys_zone=zone_off:1m use_temp_path=off;
    {servers}
}}
"""

SERVER = """
    server {{
        listen 127.0.0.1:{port};
        server_name {host};
        location / {{
            fastcgi_pass 127.0.0.1:{fcgi};
            fastcgi_param REQUEST_URI $request_uri;
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_cache {zone};
            fastcgi_cache_valid 200 60m;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
"""


class Stack:
    def __init__(self, base: Path, root: Path, web_port: int, purge_port: int) -> None:
        self.base, self.root, self.web_port, self.purge_port = base, root, web_port, purge_port

    def get(self, host: str, path: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=10)
        try:
            conn.request("GET", path, headers={"Host": host})
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            return response.getheader("X-Cache-Status") or ""
        finally:
            conn.close()

    def until_hit(self, host: str, path: str) -> None:
        deadline = time.monotonic() + 10
        while self.get(host, path) != "HIT":
            assert time.monotonic() < deadline, f"{host}{path} never became a HIT"
            time.sleep(0.05)

    def file(self, host: str, path: str) -> Path:
        return Path(cache_file(str(self.root / host), (1, 2), f"httpGET{host}{path}"))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    base = Path(tempfile.mkdtemp(prefix="cachesvc-nginx-"))
    os.chmod(base, 0o755)
    root = base / "cache"
    root.mkdir(mode=0o755)
    (base / "tmp").mkdir(mode=0o755)
    fcgi = FastCGIServer()
    web_port, purge_port = free_port(), free_port()
    user = "user www-data;" if os.geteuid() == 0 and _has_user("www-data") else ""
    servers = "".join(
        SERVER.format(port=web_port, host=f"{mode}.example", fcgi=fcgi.port, zone=f"zone_{mode}")
        for mode in ("on", "off")
    )
    (base / "nginx.conf").write_text(CONFIG.format(user=user, base=base, root=root, servers=servers))
    nginx = subprocess.Popen([NGINX, "-p", str(base), "-c", str(base / "nginx.conf")], stderr=subprocess.PIPE)
    conf = base / "cachesvc.yaml"
    conf.write_text(
        f"purge:\n  listen: tcp:{purge_port}:interface=127.0.0.1\n  roots: [{root}]\n"
        f"  zones:\n    - hosts: [on.example, off.example]\n      path: {root}/{{host}}\n"
    )
    daemon = Daemon(["--config", str(conf)], base)
    try:
        daemon.wait_for_port(purge_port)
        deadline = time.monotonic() + 10
        while True:
            try:
                Stack(base, root, web_port, purge_port).get("on.example", "/")
                break
            except (OSError, http.client.HTTPException):
                assert nginx.poll() is None, nginx.stderr.read().decode() if nginx.stderr else ""
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.1)
        yield Stack(base, root, web_port, purge_port)
    finally:
        daemon.stop()
        nginx.terminate()
        nginx.wait(10)
        fcgi.close()
        shutil.rmtree(base, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(params=["on", "off"], ids=["use_temp_path=on", "use_temp_path=off"])
def host(request: pytest.FixtureRequest) -> str:
    return f"{request.param}.example"


def test_cache_files_are_where_the_daemon_computes_them(stack: Stack, host: str) -> None:
    stack.until_hit(host, "/where")
    assert stack.file(host, "/where").is_file()


def test_url_purge_then_miss_then_hit(stack: Stack, host: str) -> None:
    stack.until_hit(host, "/post")
    assert purge(stack.purge_port, f"http://{host}/post\n".encode()) == OK
    assert not stack.file(host, "/post").exists()
    assert stack.get(host, "/post") == "MISS"
    stack.until_hit(host, "/post")


def test_url_purge_covers_the_trailing_slash_twin(stack: Stack, host: str) -> None:
    stack.until_hit(host, "/twin/")
    assert purge(stack.purge_port, f"http://{host}/twin\n".encode()) == OK
    assert stack.get(host, "/twin/") == "MISS"


def test_site_purge_then_miss_then_hit(stack: Stack, host: str) -> None:
    zone = stack.root / host
    for path in ("/a", "/b", "/c?x=1"):
        stack.until_hit(host, path)
    mode, owner = zone.stat().st_mode, zone.stat().st_uid
    assert purge(stack.purge_port, f"{zone}\n".encode()) == OK
    assert zone.is_dir() and (zone.stat().st_mode, zone.stat().st_uid) == (mode, owner)
    assert not any(f.is_file() for f in zone.rglob("*") if len(f.name) == 32)
    for path in ("/a", "/b", "/c?x=1"):
        assert stack.get(host, path) == "MISS"
        stack.until_hit(host, path)  # nginx keeps caching in the kept zone directory


def test_prefix_purge_then_miss_and_others_stay_hits(stack: Stack, host: str) -> None:
    for path in ("/blog/1", "/blog/2?page=2", "/shop/1"):
        stack.until_hit(host, path)
    assert purge(stack.purge_port, f"http://{host}/blog/*\n".encode()) == OK
    assert stack.get(host, "/blog/1") == "MISS"
    assert stack.get(host, "/blog/2?page=2") == "MISS"
    assert stack.get(host, "/shop/1") == "HIT"
    stack.until_hit(host, "/blog/1")
