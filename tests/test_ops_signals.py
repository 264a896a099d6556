"""SIGHUP and SIGUSR1 on a real ``twistd`` (cachesvc/observe/reload.py), and the reload's rules in-process.

HUP with a changed file applies it (purge zones, log levels, recache tunables); with an invalid
file, or one whose change needs a restart, it logs why and the running configuration stays (the
old port keeps answering); HUP never ends the daemon (it used to exit with 129). SIGUSR1 rotates
the log file, twistd's ``--logfile`` and ``logging.file`` alike.
"""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cachesvc import config
from cachesvc.observe.reload import RECACHE_KEYS, RECACHE_RELOADABLE, Reloader, recache_changes, restart_needed
from cachesvc.recache.settings import RecacheSettings
from harness.daemon import Daemon, free_port, purge, wait_until
from tests.test_api_e2e import Api, write_configs

OK, ERR = b"Purge: Success\n", b"Purge: Error\n"


def purge_config(conf: Path, port: int, root: Path, extra: str = "") -> None:
    conf.write_text(f"purge:\n  listen: tcp:{port}:interface=127.0.0.1\n  roots: [{root}]\n"
                    f"  zones:\n    - hosts: [old.example]\n      path: {root}/{{host}}\n{extra}")


@pytest.fixture
def running(tmp_path: Path, cache_root: Path) -> Any:
    port = free_port()
    conf = tmp_path / "cachesvc.yaml"
    purge_config(conf, port, cache_root)
    daemon = Daemon(["--config", str(conf)], tmp_path)
    daemon.wait_for_port(port)
    yield SimpleNamespace(daemon=daemon, port=port, conf=conf, root=cache_root)
    daemon.stop()


def hup(daemon: Daemon, expect: str) -> None:
    before = daemon.log.count(expect)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.log.count(expect) > before, what=f"{expect!r} after SIGHUP")
    assert daemon.proc.poll() is None


def test_changed_zones_apply(running: Any) -> None:
    assert purge(running.port, b"https://new.example/page\n") == ERR  # no zone serves it
    running.conf.write_text(running.conf.read_text().replace("[old.example]", "[old.example, new.example]"))
    hup(running.daemon, "SIGHUP: re-read")
    assert "applied purge.zones" in running.daemon.log
    assert purge(running.port, b"https://new.example/page\n") == OK


def test_log_level_changes_in_place(running: Any) -> None:
    text = running.conf.read_text()
    running.conf.write_text(text + "logging: {level: warn}\n")
    hup(running.daemon, "applied logging levels")
    assert purge(running.port, f"{running.root}/quiet\n".encode()) == OK
    running.conf.write_text(text)
    hup(running.daemon, "log levels now: console info")  # its "re-read" line was hidden at warn
    assert running.daemon.log.count("SIGHUP: re-read") == 1
    assert purge(running.port, f"{running.root}/loud\n".encode()) == OK
    running.daemon.wait_for_log("/loud' absent")
    assert "/quiet" not in running.daemon.log


@pytest.mark.parametrize(
    "text, message",
    [
        ("purge:\n  idle_timout: 30s\n", "purge.idle_timout: unknown configuration field"),
        ("purge: [not, a, mapping\n", "not valid YAML"),
        ("logging: {level: chatty}\n", "logging.level must be one of"),
    ],
    ids=["unknown-key", "yaml", "logging"],
)
def test_invalid_file_keeps_the_running_config(running: Any, text: str, message: str) -> None:
    good = running.conf.read_text()
    running.conf.write_text(text if text.startswith("purge:") else good + text)
    hup(running.daemon, "not applied, the running configuration stays")
    assert message in running.daemon.log
    assert purge(running.port, b"https://old.example/x\n") == OK
    running.conf.write_text(good)
    hup(running.daemon, "SIGHUP: re-read")


def test_a_change_that_needs_a_restart_is_not_applied(running: Any, tmp_path: Path) -> None:
    other = free_port()
    good = running.conf.read_text()
    running.conf.write_text(good.replace(f"tcp:{running.port}:", f"tcp:{other}:").replace(
        "[old.example]", "[old.example, new.example]"))
    hup(running.daemon, "need")
    assert "purge.listen needs a restart (systemctl restart cachesvc)" in running.daemon.log
    assert purge(running.port, b"https://new.example/page\n") == ERR  # nothing of the file was applied
    with pytest.raises(OSError):
        purge(other, b"/x\n", timeout=1)


def test_without_a_config_file(purge_daemon: tuple[Daemon, int]) -> None:
    daemon, port = purge_daemon
    hup(daemon, "nothing to re-read")
    hup(daemon, "nothing to re-read")
    daemon.proc.send_signal(signal.SIGUSR1)  # no log file to rotate: nothing happens, and nothing ends
    assert purge(port, b"/definitely/outside\n") == ERR and daemon.proc.poll() is None


def test_sigusr1_rotates_twistd_logfile_and_logging_file(tmp_path: Path, cache_root: Path) -> None:
    (tmp_path / "logs").mkdir()
    port = free_port()
    conf = tmp_path / "c.yaml"
    conf.write_text(f"purge:\n  listen: tcp:{port}:interface=127.0.0.1\n  roots: [{cache_root}]\n"
                    "logging:\n  console: {enabled: true}\n  file: {enabled: true, path: logs/c.log}\n")
    console = tmp_path / "twistd.log"
    daemon = Daemon(["--config", str(conf)], tmp_path, twistd_args=[f"--logfile={console}"])
    try:
        daemon.wait_for_port(port)
        assert purge(port, f"{cache_root}/before\n".encode()) == OK
        wait_until(lambda: "/before" in (tmp_path / "logs" / "c.log").read_text(), what="the file line")
        daemon.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: (tmp_path / "logs" / "c.log.1").exists() and Path(f"{console}.1").exists(),
                   what="both files rotated")
        assert purge(port, f"{cache_root}/after\n".encode()) == OK
        wait_until(lambda: "/after" in (tmp_path / "logs" / "c.log").read_text(), what="the new file")
        wait_until(lambda: "/after" in console.read_text(), what="the new console file")
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
    assert "/before" in Path(f"{console}.1").read_text() and "/before" not in console.read_text()


def test_recache_tunables_apply_and_redis_needs_a_restart(tmp_path: Path, redis_server: Any, redis: Any) -> None:
    api_port = free_port()
    conf = write_configs(tmp_path, redis_server.addr, api_port)
    daemon = Daemon(["--config", str(conf)], tmp_path)
    try:
        daemon.wait_for_port(api_port)
        good = conf.read_text()
        conf.write_text(good.replace("tick_interval: 100ms", "tick_interval: 200ms").replace(
            "max_size: 1000", "max_size: 500"))
        hup(daemon, "SIGHUP: re-read")
        assert "applied scheduler.tick_interval, internal_queue.max_size" in daemon.log
        status, body, _ = Api(api_port)("GET", "/status")
        assert status == 200 and body["internal_queue"]["max_size"] == 500
        conf.write_text(good.replace(redis_server.addr, "127.0.0.1:1").replace("request_timeout: 2s",
                                                                                "request_timeout: 3s"))
        hup(daemon, "not applied")
        assert "redis.addr, http_api.request_timeout need a restart" in daemon.log
        assert Api(api_port)("GET", "/healthz", auth=None)[0] == 200  # still on the running Redis
    finally:
        daemon.stop()


# --- in-process ----------------------------------------------------------------------------------


def recache_settings(tmp_path: Path) -> RecacheSettings:
    (tmp_path / "hosts.d").mkdir(exist_ok=True)
    (tmp_path / "hosts.d" / "a.yaml").write_text("hosts:\n  - id: 1\n    domain: a.example\n")
    (tmp_path / "edge-gateway.yaml").write_text("internal: {auth_key: k}\nhosts: {include: hosts.d}\n")
    conf = tmp_path / "cd.yaml"
    conf.write_text("eg_config: edge-gateway.yaml\ndaemon_id: cd\nredis: {addr: '127.0.0.1:1'}\n")
    resolved = config.resolve(str(conf)).recache
    assert resolved is not None
    return resolved


def test_every_recache_field_is_named() -> None:
    from dataclasses import fields

    names = {f.name for f in fields(RecacheSettings)}
    assert names == set(RECACHE_KEYS) and names >= RECACHE_RELOADABLE


def test_recache_changes_split(tmp_path: Path) -> None:
    old = recache_settings(tmp_path)
    new = replace(old, tick_interval=2.0, max_retries=5, redis_db=3, edge=replace(old.edge, warnings=("w",)))
    assert recache_changes(old, new) == (["scheduler.tick_interval", "internal_queue.max_retries"], ["redis.db"])


class FakePurge:
    def __init__(self, answer: list[str]) -> None:
        self.answer = answer
        self.calls: list[Any] = []

    def reconfigure(self, settings: Any) -> list[str]:
        self.calls.append(settings)
        return self.answer


def test_all_or_nothing(tmp_path: Path, cache_root: Path) -> None:
    purge_settings = config.resolve(None, None, [str(cache_root)]).purge
    assert purge_settings is not None
    recache = recache_settings(tmp_path)
    old = config.Settings(purge_settings, recache, source="x.yaml")
    scheduler = SimpleNamespace(settings=recache, loop=SimpleNamespace(interval=recache.tick_interval))
    state = SimpleNamespace(max_size=recache.max_size)
    fake = FakePurge([])
    changed_purge = replace(purge_settings, idle_timeout=5.0)

    def reloader(new: config.Settings) -> Reloader:
        return Reloader(old, None, fake, scheduler, state, read=lambda *_: new)  # type: ignore[arg-type]

    # A recache field that needs a restart: the purge half is not even asked.
    blocked = replace(old, purge=changed_purge, recache=replace(recache, redis_db=2, tick_interval=3.0))
    assert reloader(blocked).reload() is False and fake.calls == [] and scheduler.settings is recache
    # The purge half says it needs a restart: the recache tunables stay too.
    fake.answer = ["purge.listen"]
    assert reloader(replace(old, purge=changed_purge, recache=replace(recache, tick_interval=3.0))).reload() is False
    assert fake.calls == [changed_purge] and scheduler.loop.interval == recache.tick_interval
    # Both can: both apply.
    fake.answer = []
    r = reloader(replace(old, purge=changed_purge, recache=replace(recache, tick_interval=3.0, max_size=7)))
    assert r.reload() is True
    assert scheduler.loop.interval == 3.0 and scheduler.settings.max_size == 7 and state.max_size == 7
    assert r.settings.purge == changed_purge


def test_restart_needed_names() -> None:
    from cachesvc.config import MetricsSettings
    from cachesvc.observe.logs import LogSettings, Output

    base = config.Settings(None, None)
    assert restart_needed(base, replace(base, metrics=MetricsSettings("tcp:1", "/metrics", "edgecomet"))) == ["metrics"]
    json_console = replace(base, logging=LogSettings("info", Output("json", "info")))
    assert restart_needed(base, json_console)[0].startswith("logging (outputs")
    assert restart_needed(base, replace(base, logging=LogSettings("warn", Output("text", "warn")))) == []
