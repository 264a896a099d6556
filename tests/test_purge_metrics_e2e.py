"""The process's one metrics endpoint, end to end: ``twistd cachesvc`` with both halves, purges over the wire.

Purges of every form (path, url, prefix, soft, tag, a refusal) on the purge port, then a scrape
of ``metrics.listen``: ``promtool check metrics`` clean (or the parser's checks), no ``_created``
series, the purge half's and the process's figures beside the EdgeComet names. The Grafana
dashboard (contrib/grafana/cachesvc.json) is checked against the same scrape: each query parses
(``promtool check rules``) and names only metrics the daemon exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from harness.daemon import TOP, Daemon, free_port, purge, wait_until
from harness.nginxfiles import write_entry
from tests.test_api_e2e import write_configs
from tests.test_purge_metrics import check_exposition, value

HOST = "z.example"
OK = b"Purge: Success\n"
DASHBOARD = TOP / "contrib" / "grafana" / "cachesvc.json"


def key(path: str) -> str:
    return f"httpGET{HOST}{path}"


def scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return bytes(r.read())


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory, redis_server) -> bytes:
    base = tmp_path_factory.mktemp("metrics")
    root = base / "cache"
    zone = root / HOST
    zone.mkdir(parents=True)
    for path in ("/a", "/p1", "/p2", "/s"):
        write_entry(zone, key(path))
    for i in range(2):
        write_entry(zone, key(f"/t{i}"), headers="X-Cache-Tags: post-1\r\n")
    purge_port, metrics_port = free_port(), free_port()
    extra = f"""metrics: {{enabled: true, listen: "127.0.0.1:{metrics_port}"}}
purge:
  listen: "tcp:{purge_port}:interface=127.0.0.1"
  roots: [{root}]
  zones: [{{hosts: [{HOST}], path: "{root}/{{host}}"}}]
  tags: {{enabled: true}}
  warm: {{enabled: true, origins: {{http: "http://127.0.0.1:{free_port()}"}}}}
"""
    conf = write_configs(base, redis_server.addr, free_port(), extra=extra)
    daemon = Daemon(["--config", str(conf)], base)
    try:
        daemon.wait_for_port(purge_port)
        daemon.wait_for_port(metrics_port)
        daemon.wait_for_log("tag index ready")
        lines = [f"http://{HOST}/a", f"http://{HOST}/p*", f"soft:http://{HOST}/s", f"tag:{zone} post-1",
                 f"{zone}/0", str(zone)]
        for line in lines:
            assert purge(purge_port, f"{line}\n".encode()) == OK, line
        assert purge(purge_port, b"/etc/passwd\n") == b"Purge: Error\n"
        scrape(metrics_port)  # the first scrape starts the trash's count
        wait_until(lambda: b"cachesvc_purge_trash_backlog_files" in scrape(metrics_port), 10, "the trash counted")
        wait_until(lambda: b'cachesvc_warm_requests_total{outcome="failed"} 0.0' not in scrape(metrics_port), 10,
                   "warm-ups refused")
        return scrape(metrics_port)
    finally:
        daemon.stop()


def test_the_scrape_is_clean_and_has_both_halves_and_the_process(exposition: bytes) -> None:
    samples = check_exposition(exposition)
    requests = samples["cachesvc_purge_requests_total"]
    assert {dict(labels)["form"] for labels in requests} == {"path", "url", "prefix", "tag"}
    assert value(samples, "cachesvc_purge_requests_total", form="url", mode="soft", outcome="marked") == 1
    assert value(samples, "cachesvc_purge_requests_total", form="tag", mode="hard", outcome="deleted") == 1
    assert value(samples, "cachesvc_purge_requests_total", form="path", mode="hard", outcome="refused") == 1
    assert sum(requests.values()) == 7
    assert value(samples, "cachesvc_purge_duration_seconds_count", form="prefix") == 1
    assert value(samples, "cachesvc_purge_entries_total", mode="hard") == 1 + 2 + 2
    assert value(samples, "cachesvc_purge_trash_backlog_files") is not None
    assert (value(samples, "cachesvc_warm_requests_total", outcome="failed") or 0) >= 1
    assert any(name.startswith("cachesvc_purge_tag_index_") for name in samples)
    assert value(samples, "edgecomet_cd_in_flight") == 0
    assert value(samples, "process_start_time_seconds") and "python_info" in samples
    assert b"_created" not in exposition


def _queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append(target["expr"])
    return found


def _as_promql(expr: str) -> str:
    return (expr.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("${namespace}", "edgecomet")
            .replace("$job", ".*").replace("$instance", ".*"))


def test_the_dashboard_queries_what_the_daemon_exports(exposition: bytes) -> None:
    families = set(re.findall(rb"^# TYPE (\S+) (\S+)", exposition, re.M))
    exported = set()
    for name, kind in families:
        exported.add(name.decode())
        if kind == b"counter":
            exported.add(name.decode() + "_total")
        if kind == b"histogram":
            exported |= {name.decode() + suffix for suffix in ("_bucket", "_sum", "_count")}
    queries = [_as_promql(e) for e in _queries()]
    assert len(queries) >= 20
    named = {m for q in queries for m in re.findall(r"\b((?:cachesvc|edgecomet|process)_[a-z_]+)\b", q)}
    assert named and named <= exported, named - exported
    assert {"cachesvc_purge_requests_total", "edgecomet_cd_queue_depth", "process_cpu_seconds_total"} <= named


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) is not installed")
def test_the_dashboard_queries_parse(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"cachesvc:dashboard_{i}", "expr": q} for i, q in enumerate(map(_as_promql, _queries()))]}]}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
