"""The process's log output from ``logging:`` (cachesvc/observe/logs.py): JSON lines, levels, files, noise.

In-process: the JSON record and its fields, EdgeComet's defaults and refusals, the level filter
changed in place, file output and rotation, the quiet HTTP pool. End to end (``twistd`` in a
subprocess): a purge-only config's ``logging:`` governs the purge lines, JSON on standard output
parses line by line, ``logging.file`` alone writes the file and nothing to the console, and the
metrics port answers scrapes without an access-log line.
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from cachesvc import config
from cachesvc.configfile import ConfigError
from cachesvc.observe.logs import (
    LogControl,
    LogSettings,
    Output,
    Syslog,
    json_line,
    json_record,
    resolve_logging,
    twistd_console,
)
from cachesvc.observe.quiet import QuietHTTP11ClientFactory, quiet_pool
from cachesvc.recache.dispatch import pooled_client
from cachesvc.recache.settings import LoggingConfig
from harness.daemon import Daemon, free_port, purge, wait_until

# --- in-process ----------------------------------------------------------------------------------


def emit(observer: Any, level: LogLevel = LogLevel.info, namespace: str = "cachesvc.test", **fields: Any) -> None:
    """Log one event through a real Logger into *observer*."""
    publisher = LogPublisher(observer)
    log = Logger(namespace=namespace, observer=publisher)
    log.emit(level, "purge {path!r} {outcome}, {files} files", **fields)


def test_json_record_carries_time_level_namespace_message_and_fields() -> None:
    lines: list[str] = []
    emit(lambda e: lines.append(json_line(e, {"daemon_id": "cd-1"})), path="/cache/a", outcome="deleted", files=3)
    assert len(lines) == 1 and lines[0].endswith("\n") and "\n" not in lines[0][:-1]
    record = json.loads(lines[0])
    assert record["level"] == "info" and record["namespace"] == "cachesvc.test"
    assert record["message"] == "purge '/cache/a' deleted, 3 files"
    fields = (record["path"], record["outcome"], record["files"], record["daemon_id"])
    assert fields == ("/cache/a", "deleted", 3, "cd-1")
    assert record["time"].endswith("Z") and record["time"][10] == "T"
    assert not [k for k in record if k.startswith("log_")]


def test_json_record_of_odd_values_and_failures() -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        failure = Failure()
    event = {"log_level": LogLevel.error, "log_namespace": "x", "log_time": 0.0, "log_format": "{a} {b}",
             "log_failure": failure, "a": Path("/p"), "b": b"\xffbytes", "c": ("t", 1), "d": object()}
    record = json.loads(json_line(event))
    assert record["message"] == "/p b'\\xffbytes'" and record["a"] == "/p" and record["c"] == ["t", 1]
    assert record["b"] == "\xffbytes"  # eventAsJSON's bytes: latin-1
    assert record["d"].startswith("<object") and "ZeroDivisionError" in record["failure"]
    assert record["time"] == "1970-01-01T00:00:00.000Z"


def test_legacy_keys_do_not_repeat() -> None:
    event = {"log_level": LogLevel.info, "log_namespace": "log_legacy", "log_time": 1.0, "log_format": "{log_text}",
             "log_text": "hello", "message": ("hello",), "isError": 0, "system": "-", "time": 1.0, "format": None}
    assert set(json_record(event)) == {"time", "level", "namespace", "message"}


def test_edgecomet_defaults() -> None:
    s = resolve_logging(LoggingConfig(), None)
    assert s == LogSettings("info", Output("text", "info"), None)
    s = resolve_logging(LoggingConfig(level="WARN"), None)
    assert s.console == Output("text", "warn")


def test_console_format_and_own_level(tmp_path: Path) -> None:
    cfg = LoggingConfig(level="warn")
    cfg.console.enabled, cfg.console.format, cfg.console.level = True, "json", "debug"
    assert resolve_logging(cfg, None).console == Output("json", "debug")


def test_a_top_level_format_applies_to_every_output_that_sets_none(tmp_path: Path) -> None:
    cfg = LoggingConfig(format="json")
    assert resolve_logging(cfg, None).console == Output("json", "info")
    cfg.console.format = "console"
    assert resolve_logging(cfg, None).console == Output("text", "info")  # its own format wins
    with pytest.raises(ConfigError, match="logging.format must be json or console"):
        resolve_logging(LoggingConfig(format="xml"), None)


def test_file_alone_turns_the_console_off(tmp_path: Path) -> None:
    cfg = LoggingConfig(level="error")
    cfg.file.enabled, cfg.file.path, cfg.file.format = True, "logs/cd.log", "json"
    cfg.file.rotation.max_backups = 3
    (tmp_path / "logs").mkdir()
    s = resolve_logging(cfg, str(tmp_path / "cd.yaml"))
    assert s.console is None
    assert s.file == Output("json", "error", str(tmp_path / "logs" / "cd.log"), 100 * 1024 * 1024, 3)
    cfg.file.rotation.compress = True
    assert "not applied" in resolve_logging(cfg, str(tmp_path / "cd.yaml")).warnings[0]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: setattr(c, "level", "loud"), "logging.level must be one of debug, info, warn, error; got 'loud'"),
        (lambda c: setattr(c.console, "format", "xml"), "logging.console.format must be json or console"),
        (lambda c: setattr(c.file, "enabled", True), "logging.file.path is required"),
        (lambda c: (setattr(c.file, "enabled", True), setattr(c.file, "path", "/nonexistent-dir/x.log")),
         "does not exist; create it"),
        (lambda c: (setattr(c.file, "enabled", True), setattr(c.file, "path", "/tmp")), "is a directory"),
        (lambda c: (setattr(c.file, "enabled", True), setattr(c.file, "path", "/tmp/x.log"),
                    setattr(c.file, "format", "yaml")), "logging.file.format must be json or text"),
    ],
)
def test_refusals(change: Any, message: str) -> None:
    cfg = LoggingConfig()
    change(cfg)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_logging(cfg, None)


def test_a_purge_only_file_is_checked_too(tmp_path: Path, cache_root: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text(f"purge: {{roots: [{cache_root}]}}\nlogging: {{level: verbose}}\n")
    with pytest.raises(ConfigError, match="logging.level must be one of"):
        config.resolve(str(conf))


def test_levels_filter_and_change_in_place(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    settings = LogSettings("info", None, Output("text", "warn", str(path), None, None))
    control = LogControl(settings)
    emit(control.observer, LogLevel.info, path="/a", outcome="absent", files=0)
    emit(control.observer, LogLevel.warn, path="/b", outcome="failed", files=0)
    control.set_levels(LogSettings("info", None, Output("text", "debug", str(path), None, None)))
    emit(control.observer, LogLevel.debug, path="/c", outcome="absent", files=0)
    text = path.read_text()
    assert "'/a'" not in text and "'/b' failed" in text and "'/c'" in text
    assert "[cachesvc.test#warn]" in text  # twistd's own text format


def test_file_output_rotates(tmp_path: Path) -> None:
    path = tmp_path / "cd.log"
    control = LogControl(LogSettings("info", None, Output("json", "info", str(path), None, None)))
    emit(control.observer, path="/a", outcome="absent", files=0)
    control.rotate()
    emit(control.observer, path="/b", outcome="absent", files=0)
    assert json.loads((tmp_path / "cd.log.1").read_text())["path"] == "/a"
    assert json.loads(path.read_text())["path"] == "/b"


def test_console_and_file_each_their_format(tmp_path: Path) -> None:
    console = tmp_path / "console.txt"
    with open(console, "w") as out:
        control = LogControl(LogSettings("info", Output("json", "info"), Output("text", "info", str(tmp_path / "f"))),
                             out)
        emit(control.observer, path="/a", outcome="absent", files=0)
    assert json.loads(console.read_text())["path"] == "/a"
    assert "purge '/a' absent" in (tmp_path / "f").read_text()


def test_pools_are_quiet() -> None:
    from twisted.internet.task import Clock

    pool = quiet_pool(Clock())
    assert pool._factory is QuietHTTP11ClientFactory and not QuietHTTP11ClientFactory.noisy
    _, recache_pool = pooled_client(Clock(), 10)
    assert recache_pool._factory is QuietHTTP11ClientFactory


# --- end to end ----------------------------------------------------------------------------------


def start(tmp_path: Path, cache_root: Path, logging: str, extra: str = "", twistd_args: list[str] | None = None
          ) -> tuple[Daemon, int]:
    port = free_port()
    conf = tmp_path / "cachesvc.yaml"
    conf.write_text(f"purge:\n  listen: tcp:{port}:interface=127.0.0.1\n  roots: [{cache_root}]\n{logging}{extra}")
    daemon = Daemon(["--config", str(conf)], tmp_path, twistd_args=twistd_args)
    daemon.wait_for_port(port)
    return daemon, port


def test_json_console_lines_parse(tmp_path: Path, cache_root: Path) -> None:
    daemon, port = start(tmp_path, cache_root, "logging: {console: {enabled: true, format: json}}\n")
    try:
        assert purge(port, f"{cache_root}/a.example/1/2/x\n".encode()) == b"Purge: Success\n"
        daemon.wait_for_log("absent")
    finally:
        daemon.stop()
    records = [json.loads(line) for line in daemon.log.splitlines()]  # every line is one object
    purges = [r for r in records if r.get("outcome") == "absent"]
    assert len(purges) == 1 and purges[0]["path"] == f"{cache_root}/a.example/1/2/x"
    assert purges[0]["level"] == "info" and purges[0]["namespace"].startswith("cachesvc.purge")
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)
    assert not [r for r in records if "HTTP11ClientFactory" in r["message"]]


def test_level_warn_hides_purge_lines(tmp_path: Path, cache_root: Path) -> None:
    daemon, port = start(tmp_path, cache_root, "logging: {level: warn}\n")
    try:
        for _ in range(3):
            assert purge(port, f"{cache_root}/a.example/x\n".encode()) == b"Purge: Success\n"
        assert purge(port, b"relative/path\n") == b"Purge: Error\n"
        daemon.wait_for_log("refused")
    finally:
        daemon.stop()
    assert "absent" not in daemon.log and "starting up" not in daemon.log


def test_file_output_only(tmp_path: Path, cache_root: Path) -> None:
    (tmp_path / "logs").mkdir()
    daemon, port = start(tmp_path, cache_root,
                         "logging:\n  file: {enabled: true, path: logs/cachesvc.log, format: json, level: debug}\n")
    log_file = tmp_path / "logs" / "cachesvc.log"
    try:
        assert purge(port, f"{cache_root}/x\n".encode()) == b"Purge: Success\n"
        wait_until(lambda: log_file.exists() and "absent" in log_file.read_text(), what="the purge line in the file")
    finally:
        daemon.stop()
    assert daemon.log == ""  # the console is off when only the file is enabled
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["path"] for r in records if r.get("outcome") == "absent"] == [f"{cache_root}/x"]


def test_twistd_logfile_is_the_console(tmp_path: Path, cache_root: Path) -> None:
    """``--logfile FILE`` still decides where the console output goes, in the format logging: asks for."""
    out = tmp_path / "twistd.log"
    port = free_port()
    conf = tmp_path / "c.yaml"
    conf.write_text(f"purge:\n  listen: tcp:{port}:interface=127.0.0.1\n  roots: [{cache_root}]\n"
                    "logging: {console: {enabled: true, format: json}}\n")
    daemon = Daemon(["--config", str(conf)], tmp_path, twistd_args=[f"--logfile={out}"])
    try:
        daemon.wait_for_port(port)
        assert purge(port, f"{cache_root}/y\n".encode()) == b"Purge: Success\n"
        wait_until(lambda: "absent" in out.read_text(), what="the purge line in --logfile")
    finally:
        daemon.stop()
    assert all(json.loads(line) for line in out.read_text().splitlines())


def test_metrics_for_a_purge_only_config(tmp_path: Path, cache_root: Path) -> None:
    mport = free_port()
    daemon, port = start(tmp_path, cache_root, "",
                         f"metrics: {{enabled: true, listen: '127.0.0.1:{mport}', path: /metrics}}\n")
    try:
        daemon.wait_for_port(mport)
        for _ in range(3):
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
                assert r.status == 200 and b"# TYPE" in r.read()
        assert purge(port, f"{cache_root}/z\n".encode()) == b"Purge: Success\n"
        daemon.wait_for_log("absent")
    finally:
        daemon.stop()
    assert "GET /metrics" not in daemon.log and "Starting factory" not in daemon.log


def test_no_metrics_port_unless_enabled(tmp_path: Path, cache_root: Path) -> None:
    mport = free_port()
    daemon, _ = start(tmp_path, cache_root, "", f"metrics: {{listen: '127.0.0.1:{mport}'}}\n")
    try:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", mport), timeout=2).close()
    finally:
        daemon.stop()
    assert config.resolve(str(tmp_path / "cachesvc.yaml")).metrics is None


@pytest.mark.parametrize(
    "options, expected",
    [
        (None, "stdout"),
        ({"logfile": "-", "nodaemon": True}, "stdout"),
        ({"logfile": None, "nodaemon": True}, "stdout"),
        ({"logfile": "x.log", "nodaemon": True}, "x.log"),
        ({"logfile": None, "nodaemon": False}, "twistd.log"),
        ({"syslog": True, "prefix": "cachesvc"}, Syslog("cachesvc")),
    ],
)
def test_the_console_is_where_twistd_would_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: Any,
                                               expected: Any) -> None:
    monkeypatch.chdir(tmp_path)
    sink = twistd_console(options)
    if expected == "stdout":
        assert sink is sys.stdout
    elif isinstance(expected, Syslog):
        assert sink == expected
        assert LogControl(LogSettings(), sink).files == []
    else:
        assert isinstance(sink, LogFile) and sink.path == str(tmp_path / expected)
        assert LogControl(LogSettings(), sink).files == [sink]
        sink.close()
