"""The purge daemon end to end: ``twistd ... cachesvc`` in a subprocess, real sockets, real files."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.daemon import Daemon, free_port, purge, read_all
from harness.nginxfiles import write_entry
from tests.test_api_e2e import Api, write_configs

OK = b"Purge: Success\n"
ERR = b"Purge: Error\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int, Daemon]]:
    """One daemon for the module, configured through a YAML file with a short idle timeout."""
    base = tmp_path_factory.mktemp("purge")
    root = base / "cache"
    root.mkdir()
    port = free_port()
    conf = base / "cachesvc.yaml"
    conf.write_text(
        f"purge:\n  listen: tcp:{port}:interface=127.0.0.1\n  roots: [{root}]\n  idle_timeout: 1500ms\n"
        f"  zones:\n    - hosts: ['*']\n      path: {root}/{{host}}\n"
    )
    daemon = Daemon(["--config", str(conf)], base)
    try:
        daemon.wait_for_port(port)
        yield root, port, daemon
    finally:
        daemon.stop()


def site(root: Path, name: str, files: int = 3) -> Path:
    zone = root / name
    for i in range(files):
        d = zone / str(i % 10) / f"{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_text("cached")
    return zone


def files_below(path: Path) -> int:
    """Files under *path*, tolerating a daemon that deletes while we look."""
    return sum(len(files) for _, _, files in os.walk(path))


def test_file_purge_replies_exact_bytes(served) -> None:
    root, port, _ = served
    zone = site(root, "file.example")
    victim = zone / "1" / "01" / "f1"
    assert purge(port, f"{victim}\n".encode()) == OK
    assert not victim.exists() and (zone / "2" / "02" / "f2").exists()


def test_missing_path_is_success(served) -> None:
    root, port, _ = served
    assert purge(port, f"{root}/never.example/5/cd/ee80e68666834decf6fe00921710ccd5\n".encode()) == OK


def test_zone_root_is_emptied_and_kept(served) -> None:
    root, port, _ = served
    zone = site(root, "zone.example", files=30)
    os.chmod(zone, 0o750)
    before = zone.stat()
    assert purge(port, f"{zone}\n".encode()) == OK
    after = zone.stat()
    assert zone.is_dir() and list(zone.iterdir()) == []
    assert (after.st_mode, after.st_uid, after.st_ino) == (before.st_mode, before.st_uid, before.st_ino)


def test_deeper_directory_is_removed(served) -> None:
    root, port, _ = served
    zone = site(root, "deep.example", files=5)
    assert purge(port, f"{zone}/3\n".encode()) == OK
    assert not (zone / "3").exists() and (zone / "4").exists()


def test_refusals_touch_nothing(served, tmp_path: Path) -> None:
    root, port, _ = served
    zone = site(root, "keep.example")
    sibling = Path(str(root) + "-evil")
    sibling.mkdir(exist_ok=True)
    (sibling / "x").write_text("keep")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    requests = [
        b"\n",
        b"keep.example\n",
        f"{root}/keep.example\0/1\n".encode(),
        f"{root}/keep.example/../keep.example\n".encode(),
        f"{root}/./keep.example\n".encode(),
        f"{root}\n".encode(),
        f"{root}/\n".encode(),
        f"{sibling}/x\n".encode(),
        f"{outside}\n".encode(),
        b"/\n",
        str(root).encode() + b"/\xff\xfe\n",
    ]
    for raw in requests:
        assert purge(port, raw) == ERR, raw
    assert len(list(zone.rglob("f*"))) == 3
    assert (sibling / "x").read_text() == "keep" and outside.read_text() == "keep"
    shutil.rmtree(sibling)


def test_planted_symlinks_never_lead_outside(served, tmp_path: Path) -> None:
    root, port, _ = served
    outside = tmp_path / "secret"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "data").write_text("keep")
    (outside / "top").write_text("keep")
    zone = site(root, "links.example")
    (zone / "dirlink").symlink_to(outside)
    (zone / "filelink").symlink_to(outside / "top")
    (root / "zonelink.example").symlink_to(outside)
    (zone / "7").mkdir()
    (zone / "7" / "inner").symlink_to(outside / "sub")
    # A symlink between the root and the target: refused.
    for rel in [
        "links.example/dirlink/sub",
        "links.example/dirlink/top",
        "zonelink.example/sub/data",
        "links.example/7/inner/data",
    ]:
        assert purge(port, f"{root}/{rel}\n".encode()) == ERR, rel
    # A symlink as the target: removed as a link.
    assert purge(port, f"{zone}/filelink\n".encode()) == OK
    assert not os.path.lexists(zone / "filelink")
    # A whole zone holding symlinks: the links go, what they point to stays.
    assert purge(port, f"{zone}\n".encode()) == OK
    assert list(zone.iterdir()) == []
    assert purge(port, f"{root}/zonelink.example\n".encode()) == OK
    assert not os.path.lexists(root / "zonelink.example")
    assert (outside / "sub" / "data").read_text() == "keep" and (outside / "top").read_text() == "keep"


def test_several_lines_on_one_connection_in_order(served) -> None:
    root, port, _ = served
    zone = site(root, "multi.example", files=2)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"{zone}/0/00/f0\n\n{zone}/1/01/f1\r\n/etc/passwd\n{zone}/nothing\n".encode())
        assert read_all(s, 5) == OK + ERR + OK + ERR + OK
    assert list(zone.rglob("f*")) == []


def test_path_without_newline_is_purged_when_client_closes(served) -> None:
    root, port, _ = served
    zone = site(root, "go-cli.example", files=4)
    purge(port, str(zone).encode(), read=False)  # the Go CLI: no newline, no read
    deadline = time.monotonic() + 10
    while files_below(zone) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert files_below(zone) == 0 and zone.is_dir()


def test_overlong_line_is_refused_and_closed(served) -> None:
    root, port, _ = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"{root}/".encode() + b"a" * 5000 + b"\n")
        assert read_all(s, 1) == ERR
        assert s.recv(100) == b""  # closed


def test_idle_connection_is_closed(served) -> None:
    _, port, _ = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        started = time.monotonic()
        assert s.recv(100) == b""
        assert 1.0 < time.monotonic() - started < 8


def test_one_log_line_per_purge(served) -> None:
    root, port, daemon = served
    zone = site(root, "logged.example", files=6)
    assert purge(port, f"{zone}\n".encode()) == OK
    assert purge(port, b"/etc/shadow\n") == ERR
    daemon.wait_for_log(f"purge '{zone}' deleted (moved to trash; deleting in the background)")
    daemon.wait_for_log(f"background delete of '{zone}' finished: 6 files")
    daemon.wait_for_log("purge '/etc/shadow' refused: outside every cache root")


def test_200_concurrent_clients(served) -> None:
    root, port, _ = served
    zone = root / "busy.example"
    paths = []
    for i in range(200):
        d = zone / f"{i % 16:x}" / f"{i % 256:02x}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"hash{i}").write_text("x")
        paths.append(d / f"hash{i}")
    with ThreadPoolExecutor(200) as pool:
        replies = list(pool.map(lambda p: purge(port, f"{p}\n".encode(), timeout=30), paths))
    assert replies == [OK] * 200
    assert not any(p.exists() for p in paths)


PHP_CLIENT = r"""<?php
// The SpinupWP documentation's purge snippet: one connection, one fwrite, one fread of 512 bytes.
$path = $argv[2];
$fp = fsockopen('127.0.0.1', (int)$argv[1], $errno, $errstr, 5);
if (!$fp) { echo "connect failed: $errstr\n"; exit(2); }
fwrite($fp, $path . "\n");
$response = fread($fp, 512);
fclose($fp);
echo preg_match('/^Purge:\sSuccess/', $response) ? "purged" : "failed";
"""


def test_real_php_client(served, tmp_path: Path) -> None:
    root, port, _ = served
    php = shutil.which("php")
    assert php, "php-cli is installed by scripts/test.sh"
    script = tmp_path / "purge.php"
    script.write_text(PHP_CLIENT)
    zone = site(root, "php.example", files=5)
    def run(path: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([php, str(script), str(port), path], capture_output=True, text=True, timeout=60)

    ok = run(str(zone))
    assert ok.stdout == "purged", ok
    assert list(zone.rglob("f*")) == []
    refused = run(f"{root}/../etc")
    assert refused.stdout == "failed", refused


def test_tac_builds_the_service_from_cachesvc_config(tmp_path: Path, cache_root: Path, redis_server, redis) -> None:
    """``twistd -ny cachesvc.tac`` reads $CACHESVC_CONFIG: a non-default purge port and root, and the recache half."""
    port, api_port = free_port(), free_port()
    conf = write_configs(
        tmp_path,
        redis_server.addr,
        api_port,
        extra=f"purge:\n  listen: tcp:{port}:interface=127.0.0.1\n  roots: [{cache_root}]\n",
    )
    conf.write_text(conf.read_text().replace("daemon_id: test-daemon", "daemon_id: tac-daemon"))
    zone = site(cache_root, "tac.example")
    outside = site(tmp_path / "elsewhere", "other.example")  # a real directory, but not under the configured root
    daemon = Daemon([], tmp_path, env={"CACHESVC_CONFIG": str(conf)}, tac=True)
    try:
        daemon.wait_for_port(port)
        daemon.wait_for_port(api_port)
        assert purge(port, f"{zone}\n".encode()) == OK
        assert list(zone.rglob("f*")) == []
        assert purge(port, f"{outside}\n".encode()) == ERR
        assert files_below(outside) == 3
        api = Api(api_port)
        assert api("GET", "/healthz", auth=None)[:2] == (200, {"success": True})
        status, body, _ = api("GET", "/status")
        assert status == 200 and body["daemon"]["daemon_id"] == "tac-daemon" and list(body["queues"]) == ["1", "10"]
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    "replace, message",
    [
        (("roots: [", "idle_timout: 30s\n  roots: ["), "purge.idle_timout: unknown configuration field"),
        (("tick_interval: 100ms", "tick_interval: 50ms"), "scheduler.tick_interval must be >= 100ms"),
    ],
    ids=["purge", "recache"],
)
def test_tac_refuses_a_bad_cachesvc_config(
    tmp_path: Path, cache_root: Path, redis_server, replace: tuple[str, str], message: str
) -> None:
    conf = write_configs(
        tmp_path,
        redis_server.addr,
        free_port(),
        extra=f"purge:\n  listen: tcp:{free_port()}:interface=127.0.0.1\n  roots: [{cache_root}]\n",
    )
    conf.write_text(conf.read_text().replace(*replace))
    daemon = Daemon([], tmp_path, env={"CACHESVC_CONFIG": str(conf)}, tac=True)
    code = daemon.exit_code()
    daemon.stop()
    assert code != 0
    assert message in daemon.log and str(conf) in daemon.log and "Traceback" not in daemon.log, daemon.log


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cache-root", "/definitely/missing"], "purge.roots[0]: '/definitely/missing' does not exist"),
        (["--cache-root", "relative/dir"], "is relative"),
        (["--cache-root", "/"], "whole filesystem"),
        (["--purge-listen", "nonsense:1"], "is not a Twisted server endpoint"),
    ],
)
def test_bad_options_refuse_to_start(tmp_path: Path, args: list[str], message: str) -> None:
    daemon = Daemon(args, tmp_path)
    code = daemon.exit_code()
    daemon.stop()
    assert code != 0
    assert message in daemon.log


def test_bad_config_file_refuses_to_start(tmp_path: Path) -> None:
    conf = tmp_path / "bad.yaml"
    conf.write_text("purge:\n  idle_timout: 30s\n")
    daemon = Daemon(["--config", str(conf)], tmp_path)
    code = daemon.exit_code()
    daemon.stop()
    assert code != 0
    assert "purge.idle_timout: unknown configuration field" in daemon.log


def test_port_clash_fails_loudly(served, tmp_path: Path, cache_root: Path) -> None:
    _, port, _ = served
    daemon = Daemon(["--cache-root", str(cache_root), "--purge-listen", f"tcp:{port}:interface=127.0.0.1"], tmp_path)
    code = daemon.exit_code()
    daemon.stop()
    assert code != 0
    assert "Address already in use" in daemon.log


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the daemon as another user")
def test_io_error_answers_error_and_daemon_keeps_serving() -> None:
    """The daemon runs as the cache owner: files it may not delete are an error, logged, not a crash."""
    base = Path(tempfile.mkdtemp(prefix="cachesvc-perm-"))
    try:
        os.chmod(base, 0o755)
        root = base / "cache"
        root.mkdir(mode=0o755)
        nobody = pwd.getpwnam("nobody")
        theirs = site(root, "root-owned.example")
        mine = site(root, "nobody-owned.example")
        for p in [mine, *mine.rglob("*")]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
        port = free_port()
        daemon = Daemon(
            ["--cache-root", str(root), "--purge-listen", f"tcp:{port}:interface=127.0.0.1"],
            base,
            twistd_args=["--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid)],
        )
        try:
            daemon.wait_for_port(port)
            assert purge(port, f"{theirs}\n".encode()) == ERR
            assert len(list(theirs.rglob("f*"))) == 3
            assert purge(port, f"{mine}\n".encode()) == OK
            assert list(mine.rglob("f*")) == []
            daemon.wait_for_log("Permission denied")
            daemon.wait_for_log("cannot use trash")
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(base)


def wait_until(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_url_purge_removes_every_method_and_the_twin(served) -> None:
    root, port, _ = served
    zone = root / "url.example"
    hit = [
        write_entry(zone, k)
        for k in ("httpsGETurl.example/post", "httpsHEADurl.example/post", "httpsGETurl.example/post/")
    ]
    keep = write_entry(zone, "httpsGETurl.example/post/other")
    assert purge(port, b"https://URL.example/post\n") == OK
    assert not any(p.exists() for p in hit) and keep.exists()
    assert purge(port, b"https://url.example/post\n") == OK  # nothing left: still a success


def test_prefix_purge(served) -> None:
    root, port, daemon = served
    zone = root / "prefix.example"
    blog = [write_entry(zone, f"httpsGETprefix.example/blog/{i}?p=1") for i in range(50)]
    shop = [write_entry(zone, f"httpsGETprefix.example/shop/{i}") for i in range(50)]
    assert purge(port, b"https://prefix.example/blog/*\n") == OK
    assert not any(p.exists() for p in blog) and all(p.exists() for p in shop)
    daemon.wait_for_log("purge 'https://prefix.example/blog/*' deleted, 50 of 100 files matched")


def test_url_and_trash_refusals(served) -> None:
    root, port, _ = served
    assert purge(port, f"{root}/.cachesvc-trash\n".encode()) == ERR
    assert purge(port, f"{root}/.cachesvc-trash/x\n".encode()) == ERR
    assert purge(port, b"https://../etc\n") == ERR
    assert purge(port, b"gopher://example.com/\n") == ERR  # not a URL: an invalid relative path
    assert (root / ".cachesvc-trash").is_dir()


def test_large_zone_purge_replies_before_deleting(served) -> None:
    root, port, daemon = served
    zone = root / "large.example"
    for i in range(20000):
        d = zone / f"{i % 16:x}" / f"{i % 256:02x}"
        if i < 256:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:032x}").write_bytes(b"x")
    started = time.monotonic()
    assert purge(port, f"{zone}\n".encode()) == OK
    replied = time.monotonic() - started
    assert files_below(zone) == 0 and zone.is_dir()  # gone from nginx's view at reply time
    assert replied < 2.0, replied  # generous: the reply does not wait for 20,000 unlinks
    wait_until(lambda: files_below(root / ".cachesvc-trash") == 0)
    daemon.wait_for_log(f"background delete of '{zone}' finished: 20000 files")


def test_leftover_trash_is_deleted_at_start(tmp_path: Path, cache_root: Path) -> None:
    leftover = cache_root / ".cachesvc-trash" / "1234-0" / "tree" / "a"
    leftover.mkdir(parents=True)
    for i in range(10):
        (leftover / str(i)).write_text("x")
    port = free_port()
    daemon = Daemon(["--cache-root", str(cache_root), "--purge-listen", f"tcp:{port}:interface=127.0.0.1"], tmp_path)
    try:
        daemon.wait_for_port(port)
        wait_until(lambda: not any((cache_root / ".cachesvc-trash").iterdir()))
        daemon.wait_for_log("deleted 10 leftover files from trash")
    finally:
        daemon.stop()


def test_trash_on_another_filesystem_deletes_in_place(tmp_path: Path, cache_root: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == cache_root.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary directory")
    trash = Path(tempfile.mkdtemp(dir=shm)) / "trash"
    conf = tmp_path / "c.yaml"
    port = free_port()
    conf.write_text(
        f"purge:\n  listen: tcp:{port}:interface=127.0.0.1\n  roots: [{cache_root}]\n  trash_dir: {trash}\n"
    )
    zone = site(cache_root, "inplace.example", files=7)
    daemon = Daemon(["--config", str(conf)], tmp_path)
    try:
        daemon.wait_for_port(port)
        daemon.wait_for_log("is not on the trash's filesystem")
        assert purge(port, f"{zone}\n".encode()) == OK
        assert files_below(zone) == 0 and zone.is_dir()
        daemon.wait_for_log(f"purge '{zone}' deleted, 7 files")
    finally:
        daemon.stop()
        shutil.rmtree(trash.parent)
