"""The ``cachesvc`` command without a daemon: arguments, exit statuses, endpoints, check-config, tables.

``main(argv, out, err)`` in-process; what needs a running daemon is in test_cli_e2e.py.
"""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cachesvc import cli
from cachesvc.cli_config import Pruner, check_systemd_listen, errors_in, render, resolve_here
from cachesvc.cli_net import Address, NoAddress, client_address, parse_address, socket_unit_address, split_endpoint
from cachesvc.cli_recache import age, find_host, size, table
from cachesvc.config import ConfigError
from cachesvc.recache.edgeconfig import load_edge_config
from tests.test_api_e2e import write_configs


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


# --- arguments and exit statuses -----------------------------------------------------------------


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["purge", "--soft", "--hard", "/x"], ["check-config"],
                                  ["dead-letters"], ["dead-letters", "burn"], ["queue", "--limit", "x"]])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    code, _, err = run(*argv)
    assert code == 2 and "usage: cachesvc" in err


def test_help_and_version_exit_0() -> None:
    code, out, _ = run("--help")
    assert code == 0 and "purge" in out and "check-config" in out and "78 configuration error" in out
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("cachesvc ")
    code, out, _ = run("purge", "--help")
    assert code == 0 and "tag:<scope>" in out


def test_purge_lines_prefix_the_mode_and_refuse_what_cannot_be_one_line() -> None:
    assert cli.purge_lines(["/cache/a", "https://x.example/*"], None) == [b"/cache/a", b"https://x.example/*"]
    assert cli.purge_lines(["/cache/a", "tag:/cache/x post-1,home"], "soft") == [
        b"soft:/cache/a", b"soft:tag:/cache/x post-1,home"]
    assert cli.purge_lines(["soft:/cache/a"], None) == [b"soft:/cache/a"]
    for bad, mode in (("/a\n/b", None), ("", None), ("hard:/a", "soft")):
        with pytest.raises(cli.UsageError):
            cli.purge_lines([bad], mode)


def test_purge_usage_errors(tmp_path: Path) -> None:
    code, _, err = run("purge", "--endpoint", "127.0.0.1:1")
    assert code == 2 and "no targets" in err
    code, _, err = run("purge", "--soft", "--endpoint", "127.0.0.1:1", "hard:/cache/x")
    assert code == 2 and "names its own mode" in err
    code, _, err = run("purge", "--endpoint", "nowhere", "/cache/x")
    assert code == 2 and "not an address" in err


def test_purge_unreachable_exits_1(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        code, out, err = run("purge", "--endpoint", f"127.0.0.1:{port}", "/cache/x")
    assert code == 1 and out == "" and "cannot connect to 127.0.0.1" in err


def test_purge_bad_config_exits_78(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text("purge: {listne: x}\n")
    code, _, err = run("purge", "--config", str(conf), "/cache/x")
    assert code == 78 and "purge.listne: unknown configuration field" in err
    code, _, err = run("purge", "--config", str(tmp_path / "missing.yaml"), "/cache/x")
    assert code == 78 and "cannot read config file" in err


@pytest.fixture
def one_reply_server() -> Iterator[tuple[int, list[bytes]]]:
    """A server that answers each line: Success, except for lines containing 'bad'."""
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                seen.append(line)
                conn.sendall(b"Purge: Error\n" if b"bad" in line else b"Purge: Success\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], seen
    server.close()
    thread.join(5)


def test_purge_sends_one_line_per_target_on_one_connection(one_reply_server: tuple[int, list[bytes]]) -> None:
    port, seen = one_reply_server
    code, out, _ = run("purge", "--endpoint", f"127.0.0.1:{port}", "--soft", "/cache/a", "/cache/bad", "/cache/c")
    assert code == 1  # one reply was not Success
    assert seen == [b"soft:/cache/a\n", b"soft:/cache/bad\n", b"soft:/cache/c\n"]
    assert out.splitlines() == ["Purge: Success\tsoft:/cache/a", "Purge: Error\tsoft:/cache/bad",
                                "Purge: Success\tsoft:/cache/c"]


def test_config_path_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CACHESVC_CONFIG", raising=False)
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", str(tmp_path / "etc.yaml"))
    assert cli.config_path(None) is None
    (tmp_path / "etc.yaml").write_text("")
    assert cli.config_path(None) == str(tmp_path / "etc.yaml")
    monkeypatch.setenv("CACHESVC_CONFIG", "/env.yaml")
    assert cli.config_path(None) == "/env.yaml" and cli.config_path("/given.yaml") == "/given.yaml"


# --- endpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint, address", [
    ("tcp:7836:interface=127.0.0.1", Address("127.0.0.1", 7836)),
    ("tcp:7836", Address("127.0.0.1", 7836)),
    ("tcp:port=7836:interface=0.0.0.0:backlog=1024", Address("127.0.0.1", 7836)),
    ("tcp:7836:10.0.0.5", Address("10.0.0.5", 7836)),
    (r"tcp6:7836:interface=\:\:1", Address("::1", 7836)),
    (r"tcp6:7836:interface=\:\:", Address("::1", 7836)),
    ("tcp6:7836", Address("::1", 7836)),
    ("unix:/run/cachesvc/purge.sock", Address(path="/run/cachesvc/purge.sock")),
    ("unix:address=/run/p.sock:mode=660", Address(path="/run/p.sock")),
])
def test_client_address_of_a_server_endpoint(endpoint: str, address: Address) -> None:
    assert client_address(endpoint, "purge.listen") == address


def test_endpoints_the_command_cannot_reach_by_itself() -> None:
    for endpoint in ("systemd:domain=INET:index=0", "ssl:443", "tcp:interface=127.0.0.1", "unix:"):
        with pytest.raises(NoAddress):
            client_address(endpoint, "purge.listen")
    assert split_endpoint(r"unix:/a\:b:mode=600") == ("unix", ["/a:b"], {"mode": "600"})


def test_parse_address_forms() -> None:
    assert parse_address("7836") == Address("127.0.0.1", 7836)
    assert parse_address("example.com:80") == Address("example.com", 80)
    assert parse_address("[::1]:7836") == Address("::1", 7836)
    assert parse_address("/run/p.sock") == Address(path="/run/p.sock")
    assert parse_address("tcp:9:interface=127.0.0.2") == Address("127.0.0.2", 9)
    assert str(Address("::1", 1)) == "[::1]:1" and str(Address(path="/s")) == "/s"
    for bad in ("x", "host:0", "host:99999"):
        with pytest.raises(NoAddress):
            parse_address(bad)


def test_socket_unit_listen() -> None:
    assert socket_unit_address("127.0.0.1:7836 (Stream)\n") == Address("127.0.0.1", 7836)
    assert socket_unit_address("Listen=/run/cachesvc/purge.sock (Stream)") == Address(path="/run/cachesvc/purge.sock")
    assert socket_unit_address("[::]:7836 (Stream)") == Address("::1", 7836)
    assert socket_unit_address("") is None and socket_unit_address("/dev/x (FIFO)") is None


# --- check-config --------------------------------------------------------------------------------


def test_every_error_at_once(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    conf = tmp_path / "c.yaml"
    conf.write_text(f"""purge:
  roots: [{root}, relative, {root}/missing]
  idle_timout: 30s
  max_connections: many
  mode: medium
  warm: {{concurrency: 0, delay: forever}}
  zones:
    - {{hosts: [a.example], path: "{root}/{{host}}", levels: "3:3"}}
    - {{hosts: [b.example], path: "{root}/{{host}}"}}
    - {{hosts: [], path: "{root}/{{host}}"}}
redis: {{addr: 1}}
bogus: 1
logging: {{level: loud}}
""")
    code, out, err = run("check-config", str(conf))
    assert code == 78 and out == ""
    lines = err.splitlines()
    c = str(conf)
    expected = [
        f"{c}: purge.idle_timout: unknown configuration field",
        f"{c}: purge.max_connections: expected a whole number, got a string 'many'",
        f"{c}: purge.warm.delay: invalid duration 'forever'",
        f"{c}: redis.addr: expected a string",
        f"{c}: bogus: unknown configuration field",
        f"{c}: purge.mode: 'medium' is not a purge mode",
        f"{c}: purge.roots[1]: 'relative' is relative",
        f"{c}: purge.roots[2]: '{root}/missing' does not exist",  # its index in the file, after [1] was taken out
        f"{c}: purge.zones[0]: levels: '3:3' is not nginx syntax",
        f"{c}: purge.zones[2]: hosts: list the host names",
        f"{c}: purge.warm.concurrency: 0 is out of range",
        f"{c}: logging.level must be one of debug, info, warn, error; got 'loud'",
    ]
    assert len(lines) == len(expected) + 1, err
    for line, start in zip(lines, expected, strict=False):
        assert line.startswith(start), (line, start)
    assert lines[-1] == f"cachesvc: configuration file {c} test failed (12 errors)"


def test_the_recache_half_and_the_process_sections_are_checked_too(tmp_path: Path) -> None:
    conf = write_configs(tmp_path, "127.0.0.1:6379", 10090, extra="metrics: {enabled: true}\n")
    code, _, err = run("check-config", str(conf))
    assert code == 78 and "metrics.listen is required when metrics are enabled" in err
    conf.write_text(conf.read_text().replace("tick_interval: 100ms", "tick_interval: 10ms"))
    code, _, err = run("check-config", str(conf))
    assert err.splitlines()[:2] == [f"{conf}: scheduler.tick_interval must be >= 100ms, got 10ms",
                                    f"{conf}: metrics.listen is required when metrics are enabled, e.g. :10099"]
    assert code == 78 and "(2 errors)" in err
    (tmp_path / "edge-gateway.yaml").unlink()
    assert any("eg_config" in e for e in errors_in(str(conf)))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert errors_in(str(empty)) == [f"{empty}: nothing to run; add a purge: section or eg_config (see README), "
                                     "or pass --cache-root"]
    code, _, err = run("check-config", str(tmp_path / "none.yaml"))
    assert code == 78 and "cannot read config file" in err and "(1 error)" in err


def test_a_good_file_prints_what_would_run_with_defaults_and_no_secret(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    conf = write_configs(tmp_path, "127.0.0.1:6379", 10090, extra=f"""redis_password_is_hidden: ~
purge:
  listen: "systemd:domain=INET:name=purge"
  roots: [{root}]
  zones: [{{hosts: [a.example], path: "{root}/{{host}}"}}]
""".replace("redis_password_is_hidden: ~\n", ""))
    conf.write_text(conf.read_text().replace('password: ""', 'password: "s3cret"'))
    conf.chmod(0o600)
    code, out, err = run("check-config", str(conf))
    assert code == 0, err
    assert err.strip().endswith(f"cachesvc: configuration file {conf} test is successful")
    assert "s3cret" not in out and "test-internal-auth-key" not in out
    shown = yaml.safe_load(out)
    purge, recache = shown["purge"], shown["recache"]
    assert purge["listen"] == "systemd:domain=INET:name=purge"  # checked for its form only
    assert purge["idle_timeout"] == "30s" and purge["max_connections"] == 512 and purge["mode"] == "hard"
    assert purge["trash_dir"] == f"{root}/.cachesvc-trash"
    assert purge["zones"][0]["key"] == "$scheme$request_method$host$request_uri"
    assert purge["warm"]["slow_response"] == "2s" and purge["tags"]["enabled"] is False
    assert recache["daemon_id"] == "test-daemon" and recache["tick_interval"] == "100ms"
    assert recache["lease"] == "120s" and recache["rs_capacity_reserved"] == 0.3
    assert recache["redis_password"] == "(set, hidden)" and recache["edge"]["auth_key"] == "(set, hidden)"
    assert recache["edge"]["hosts_count"] == 2 and recache["api_listen"] == "tcp:10090:interface=127.0.0.1"
    assert shown["logging"]["level"] == "info" and shown["metrics"] is None


def test_systemd_endpoints_checked_for_their_form(tmp_path: Path) -> None:
    for good in ("systemd:domain=INET:index=0", "systemd:domain=UNIX:name=purge"):
        check_systemd_listen(good, "f")
    for bad in ("systemd:index=0", "systemd:domain=IP:index=0", "systemd:domain=INET", "systemd:domain=INET:index=x",
                "systemd:domain=INET:index=0:name=a", "systemd:0"):
        with pytest.raises(ConfigError, match="purge.listen"):
            check_systemd_listen(bad, "f")
    root = tmp_path / "cache"
    root.mkdir()
    conf = tmp_path / "c.yaml"
    conf.write_text(f'purge: {{listen: "systemd:domain=INET:index=0", roots: [{root}]}}\n')
    assert resolve_here(str(conf)).purge.listen == "systemd:domain=INET:index=0"  # type: ignore[union-attr]
    conf.write_text(f'purge: {{listen: "systemd:domain=INET", roots: [{root}]}}\n')
    assert [e.split(": ", 2)[1] for e in errors_in(str(conf))] == ["purge.listen"]


def test_pruner_gives_indices_back_and_gives_up_where_nothing_can_be_taken_out() -> None:
    errors: list[str] = []
    pruner = Pruner({"a": {"l": [1, 2, 3, 4]}}, "f", errors)
    assert pruner._take_out(["a", "l", "[1]"])
    assert pruner._in_file("f: a.l[1]: bad") == ("f: a.l[2]: bad", ["a", "l", "[2]"])
    assert pruner._take_out(["a", "l", "[2]"]) and pruner.data == {"a": {"l": [1, 4]}}
    assert pruner._in_file("f: a.l[1]: bad")[0] == "f: a.l[3]: bad"
    assert not pruner._take_out(["a", "missing"]) and not pruner._take_out(["b"])
    assert pruner._in_file("elsewhere: x") == ("elsewhere: x", None)

    def never(_: object) -> None:
        raise ConfigError("f: daemon_id must be specified")

    assert pruner.until_clean(never) is None and pruner.gave_up and errors == ["f: daemon_id must be specified"]


def test_render_walks_any_settings(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    conf = tmp_path / "c.yaml"
    conf.write_text(f"purge: {{roots: [{root}]}}\n")
    shown = yaml.safe_load(render(resolve_here(str(conf))))
    assert list(shown) == ["purge", "recache", "logging", "metrics"] and shown["recache"] is None


# --- tables --------------------------------------------------------------------------------------


def test_table_aligns_and_right_aligns_numbers() -> None:
    assert table([["HOST", "TOTAL", "NAME"], [1, 1200, "a"], [10, 3, "bb"]]).splitlines() == [
        "HOST  TOTAL  NAME", "   1  1,200  a", "  10      3  bb"]


def test_age_size_and_hosts(tmp_path: Path) -> None:
    assert [age(s) for s in (-1, 5, 65, 3600 * 2 + 180, 86400 * 4 + 7200)] == ["0s", "5s", "1m05s", "2h03m", "4d02h"]
    assert [size(b) for b in (0, 1023, 1536, 5 * 2**30)] == ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"]
    write_configs(tmp_path, "127.0.0.1:6379", 10090)
    edge = load_edge_config(str(tmp_path / "edge-gateway.yaml"))
    assert find_host(edge, "10").id == 10 and find_host(edge, "WWW.ten.example.com").id == 10  # type: ignore[union-attr]
    assert find_host(edge, "2") is None
