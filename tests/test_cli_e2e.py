"""The ``cachesvc`` command against running daemons: ``python -m cachesvc.cli`` in a subprocess, as a user runs it.

One daemon runs both halves (purge with zones and tags, the recache half on the suite's real
Redis, a fake Edge Gateway registered in it, the API, metrics); the scheduler is paused while a
test lays out queues, so what the command shows is what the test wrote. Another runs the purge
half alone, without metrics. Every subcommand and every exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_py
import yaml

from cachesvc.recache.members import encode_member
from harness.daemon import TOP, Daemon, free_port, wait_until
from harness.fake_eg import FakeEG
from harness.nginxfiles import write_entry
from tests.test_api_e2e import KEY, Api, write_configs
from tests.test_purge_metrics import check_exposition

HOST = "z.example"
PAUSE = "/internal/scheduler/pause"


@dataclass
class Running:
    base: Path
    conf: Path
    daemon: Daemon
    api: Api
    purge_port: int
    metrics_port: int
    zone: Path
    eg: FakeEG

    def cli(self, *args: str, stdin: str | None = None, config: bool = True) -> subprocess.CompletedProcess[str]:
        return cachesvc(*(["--config", str(self.conf)] if config else []), *args, stdin=stdin)


def cachesvc(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cachesvc.cli", *args], cwd=TOP, input=stdin, text=True,
                          capture_output=True, timeout=60, env={**os.environ, **(env or {})})


def key(path: str) -> str:
    return f"httpGET{HOST}{path}"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, redis_server) -> Iterator[Running]:
    base = tmp_path_factory.mktemp("cli")
    root = base / "cache"
    zone = root / HOST
    zone.mkdir(parents=True)
    api_port, purge_port, metrics_port = free_port(), free_port(), free_port()
    extra = f"""metrics: {{enabled: true, listen: "127.0.0.1:{metrics_port}"}}
purge:
  listen: "tcp:{purge_port}:interface=127.0.0.1"
  roots: [{root}]
  zones: [{{hosts: [{HOST}], path: "{root}/{{host}}"}}]
  tags: {{enabled: true}}
"""
    conf = write_configs(base, redis_server.addr, api_port, extra=extra)
    eg = FakeEG(base, redis_server.addr)
    daemon = Daemon(["--config", str(conf)], base)
    try:
        for port in (purge_port, api_port, metrics_port):
            daemon.wait_for_port(port)
        yield Running(base, conf, daemon, Api(api_port), purge_port, metrics_port, zone, eg)
    finally:
        daemon.stop()
        eg.stop()


@pytest.fixture
def paused(running: Running, redis) -> Iterator[Running]:
    """The scheduler paused (so queued entries stay where a test put them) on a flushed Redis."""
    assert running.api("POST", PAUSE)[0] == 200
    yield running
    running.api("POST", "/internal/scheduler/resume")


# --- purge ---------------------------------------------------------------------------------------


def test_purge_every_form_then_scrape(running: Running) -> None:
    zone = running.zone
    for path in ("/a", "/p1", "/p2", "/s"):
        write_entry(zone, key(path))
    tagged = write_entry(zone, key("/t"), headers="X-Cache-Tags: post-1\r\n")
    wait_until(lambda: "tag index ready" in running.daemon.log, 10, "the tag index")
    done = running.cli("purge", f"http://{HOST}/a", f"http://{HOST}/p*", f"tag:{zone} post-1", f"{zone}/0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"Purge: Success\thttp://{HOST}/a", f"Purge: Success\thttp://{HOST}/p*",
        f"Purge: Success\ttag:{zone} post-1", f"Purge: Success\t{zone}/0",
    ]
    assert not tagged.exists()
    done = running.cli("purge", "--soft", f"http://{HOST}/s")
    assert done.returncode == 0 and done.stdout == f"Purge: Success\tsoft:http://{HOST}/s\n"
    running.daemon.wait_for_log(f"purge 'soft:http://{HOST}/s' marked")
    done = running.cli("purge", "-", stdin=f"{zone}\n\n/etc/passwd\n")  # from standard input; one refused
    assert done.returncode == 1
    assert done.stdout.splitlines() == [f"Purge: Success\t{zone}", "Purge: Error\t/etc/passwd"]
    with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10) as r:
        samples = check_exposition(r.read())
    requests = samples["cachesvc_purge_requests_total"]
    forms = {dict(labels)["form"] for labels in requests}
    assert forms == {"url", "prefix", "tag", "path"}
    assert sum(requests.values()) == 7
    assert samples["cachesvc_purge_entries_total"][(("mode", "soft"),)] == 1
    assert "edgecomet_cd_in_flight" in samples and "process_cpu_seconds_total" in samples


def test_purge_hard_flag_and_exit_statuses(running: Running, tmp_path: Path) -> None:
    done = running.cli("purge", "--hard", f"{running.zone}/nothing")
    assert done.returncode == 0 and done.stdout == f"Purge: Success\thard:{running.zone}/nothing\n"
    assert running.cli("purge", "--soft", f"hard:{running.zone}").returncode == 2
    assert running.cli("purge").returncode == 2
    closed = free_port()
    done = running.cli("purge", "--endpoint", f"127.0.0.1:{closed}", "/x")
    assert done.returncode == 1 and f"cannot connect to 127.0.0.1:{closed}" in done.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("purge: [1]\n")
    done = cachesvc("purge", "--config", str(bad), "/x")
    assert done.returncode == 78 and "purge: expected a mapping" in done.stderr
    # The config from $CACHESVC_CONFIG
    done = cachesvc("purge", f"{running.zone}/nothing", env={"CACHESVC_CONFIG": str(running.conf)})
    assert done.returncode == 0


# --- check-config --------------------------------------------------------------------------------


def test_check_config(running: Running, tmp_path: Path) -> None:
    done = cachesvc("check-config", str(running.conf))
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    assert shown["recache"]["daemon_id"] == "test-daemon" and shown["purge"]["tags"]["enabled"] is True
    assert shown["metrics"]["listen"] == f"tcp:{running.metrics_port}:interface=127.0.0.1"
    assert KEY not in done.stdout
    bad = tmp_path / "cache-daemon.yaml"
    bad.write_text(running.conf.read_text().replace("daemon_id: test-daemon", "daemon_id: ''")
                   .replace("roots: [", "roots: [relative, ").replace("request_timeout: 2s", "request_timeout: x"))
    done = cachesvc("check-config", str(bad))
    assert done.returncode == 78 and done.stdout == ""
    assert done.stderr.splitlines()[-1] == f"cachesvc: configuration file {bad} test failed (3 errors)"
    assert "http_api.request_timeout" in done.stderr and "purge.roots[0]" in done.stderr
    assert "daemon_id must be specified" in done.stderr
    assert cachesvc("check-config").returncode == 2


# --- status --------------------------------------------------------------------------------------


def test_status_of_both_halves(paused: Running, redis: redis_py.Redis) -> None:
    now = int(time.time())
    redis.zadd("recache:1:normal", {encode_member("https://test.example.com/n", 1): now - 30,
                                    encode_member("https://test.example.com/later", 1): now + 3600})
    done = paused.cli("status")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith("purge\n") and "\nrecache\n" in text
    assert "accepting connections" in text and str(paused.zone.parent) in text
    assert "trash backlog" in text and " files, " in text  # from the metrics: files and bytes too
    assert f"tag index {paused.zone}" in text and ", ready" in text
    assert "daemon.daemon_id" in text and "test-daemon" in text and "rs_capacity.total_free_tabs" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.strip().startswith("HOST"))
    assert header.split() == ["HOST", "HIGH", "DUE", "NORMAL", "DUE", "AUTORECACHE", "DUE", "DEAD", "LETTERS"]
    row = lines[lines.index(header) + 1].split()
    assert row == ["1", "0", "0", "2", "1", "0", "0", "0"]
    done = paused.cli("status", "--json")
    report = json.loads(done.stdout)
    assert report["recache"]["queues"]["1"]["normal"] == {"total": 2, "due_now": 1}
    assert report["purge"]["purge port"] == "accepting connections"


def test_status_fails_when_the_api_is_not_there(running: Running) -> None:
    done = running.cli("status", "--api", f"127.0.0.1:{free_port()}")
    assert done.returncode == 1 and "recache: GET http://127.0.0.1" in done.stderr and "purge\n" in done.stdout


def test_status_with_a_wrong_key_says_so(running: Running, tmp_path: Path) -> None:
    conf = running.conf.read_text().replace("eg_config: edge-gateway.yaml", f"eg_config: {tmp_path}/eg.yaml")
    (tmp_path / "eg.yaml").write_text((running.base / "edge-gateway.yaml").read_text().replace(KEY, "wrong")
                                      .replace("include: hosts.d", f"include: {running.base}/hosts.d"))
    (tmp_path / "c.yaml").write_text(conf)
    done = cachesvc("status", "--config", str(tmp_path / "c.yaml"))
    assert done.returncode == 1 and "HTTP 401" in done.stderr and "internal.auth_key" in done.stderr


@pytest.fixture
def purge_only(tmp_path: Path, cache_root: Path) -> Iterator[tuple[Path, int]]:
    port = free_port()
    conf = tmp_path / "purge.yaml"
    conf.write_text(f'purge: {{listen: "tcp:{port}:interface=127.0.0.1", roots: [{cache_root}]}}\n')
    daemon = Daemon(["--config", str(conf)], tmp_path)
    try:
        daemon.wait_for_port(port)
        yield conf, port
    finally:
        daemon.stop()


def test_status_without_metrics_reads_the_trash(purge_only: tuple[Path, int], cache_root: Path) -> None:
    conf, _ = purge_only
    done = cachesvc("status", "--config", str(conf))
    assert done.returncode == 0, done.stderr
    assert "recache" not in done.stdout
    assert "0 directories (from the filesystem; enable metrics" in done.stdout


def test_queue_and_dead_letters_need_the_recache_half(purge_only: tuple[Path, int]) -> None:
    conf, _ = purge_only
    for args in (["queue"], ["dead-letters", "list"]):
        done = cachesvc(*args, "--config", str(conf))
        assert done.returncode == 78 and "no recache half (eg_config)" in done.stderr


def test_status_when_the_purge_daemon_is_down(tmp_path: Path, cache_root: Path) -> None:
    conf = tmp_path / "purge.yaml"
    conf.write_text(f'purge: {{listen: "tcp:{free_port()}:interface=127.0.0.1", roots: [{cache_root}]}}\n')
    done = cachesvc("status", "--config", str(conf))
    assert done.returncode == 1 and "not reachable: cannot connect" in done.stdout


# --- queue ---------------------------------------------------------------------------------------


def test_queue_depth_due_and_oldest(paused: Running, redis: redis_py.Redis) -> None:
    now = int(time.time())
    redis.zadd("recache:1:high", {encode_member("https://test.example.com/h1", 1): now - 125,
                                  encode_member("https://test.example.com/h2", 2): now - 5})
    redis.zadd("recache:1:autorecache", {encode_member("https://test.example.com/a", 1): now + 600})
    redis.zadd("recache:10:normal", {encode_member("https://ten.example.com/n", 1): now - 3700})
    done = paused.cli("queue")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    assert rows[0] == ["HOST", "DOMAIN", "PRIORITY", "TOTAL", "DUE", "NOW", "OLDEST", "DUE"]
    by = {(r[0], r[2]): r[3:] for r in rows[1:]}
    assert by[("1", "high")][:2] == ["2", "2"] and by[("1", "high")][2] in ("2m05s", "2m06s", "2m07s")
    assert by[("1", "normal")] == ["0", "0", "-"] and by[("1", "autorecache")] == ["1", "0", "-"]
    assert by[("10", "normal")][:2] == ["1", "1"] and by[("10", "normal")][2].startswith("1h01m")
    assert len(rows) == 1 + 6
    done = paused.cli("queue", "ten.example.com", "--json")
    got = json.loads(done.stdout)
    assert [r["priority"] for r in got] == ["high", "normal", "autorecache"] and got[1]["due_now"] == 1
    assert 3690 < got[1]["oldest_due_seconds"] < 3760
    done = paused.cli("queue", "nope.example")
    assert done.returncode == 2 and "no host 'nope.example'" in done.stderr and "10 (ten.example.com" in done.stderr


# --- dead letters --------------------------------------------------------------------------------


def dead(redis: redis_py.Redis, host: int, queue: str, url: str, reason: str, failed_at: int) -> None:
    member = encode_member(url, 1)
    field = f"recache:{host}:{queue}".encode() + b"\n" + member
    redis.hset(f"cachesvc:deadletter:{host}", field, json.dumps({"reason": reason, "attempts": 3,
                                                                  "failed_at": failed_at}))


def test_dead_letters_list_and_requeue(paused: Running, redis: redis_py.Redis) -> None:
    assert paused.cli("dead-letters", "list").stdout == "no dead-lettered entries\n"
    dead(redis, 1, "high", "https://test.example.com/d1", "max retries exceeded", 1_700_000_000)
    dead(redis, 1, "normal", "https://test.example.com/d2", "rejected: 400", 1_700_000_100)
    dead(redis, 10, "high", "https://ten.example.com/d3", "rejected: 404", 1_700_000_200)
    done = paused.cli("dead-letters", "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["HOST", "PRIORITY", "ATTEMPTS", "FAILED", "AT", "REASON", "DIMENSION", "URL"]
    assert lines[1].split()[:4] == ["1", "high", "3", "2023-11-14T22:13:20Z"]
    assert lines[1].endswith("https://test.example.com/d1") and "max retries exceeded" in lines[1]
    assert len(lines) == 4
    assert len(json.loads(paused.cli("dead-letters", "list", "10", "--json").stdout)) == 1
    assert len(json.loads(paused.cli("dead-letters", "list", "--limit", "2", "--json").stdout)) == 2
    assert paused.cli("dead-letters", "requeue").returncode == 2
    assert paused.cli("dead-letters", "requeue", "1", "--all").returncode == 2
    done = paused.cli("dead-letters", "requeue", "test.example.com")
    assert done.returncode == 0 and done.stdout == "host 1: 2 entries requeued\n"
    assert redis.zcard("recache:1:high") == 1 and redis.zcard("recache:1:normal") == 1
    done = paused.cli("dead-letters", "requeue", "--all")
    assert done.stdout == "host 1: 0 entries requeued\nhost 10: 1 entries requeued\n"
    # Resumed, the scheduler sends what was requeued to the gateway.
    assert paused.api("POST", "/internal/scheduler/resume")[0] == 200
    wait_until(lambda: {(e["json"] or {}).get("url") for e in paused.eg.events("end")} >= {
        "https://test.example.com/d1", "https://test.example.com/d2", "https://ten.example.com/d3"}, 15,
        "the requeued entries sent")
    wait_until(lambda: all(r["total"] == 0 for r in json.loads(paused.cli("queue", "--json").stdout)), 10,
               "the queues drained")


def test_the_console_script() -> None:
    script = Path(sys.executable).parent / "cachesvc"
    if not script.exists():
        pytest.skip("the package is not installed with its console script (pip install .)")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith("cachesvc ")
    done = subprocess.run([str(script), "check-config"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
