"""The shipped service definitions: contrib/systemd/cachesvc.{service,socket} and contrib/supervisor/cachesvc.conf.

``systemd-analyze verify`` (on a copy whose ``ExecStart`` names this checkout's twistd: the shipped
path is an install location) and ``systemd-analyze security --offline=yes`` (exposure at most 3.0)
on the units as shipped, plus the settings the daemon relies on: readiness, reload by HUP, no
restart loop on exit status 78, the socket named ``purge``, one capability. The units and the
Supervisor example are package data.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.daemon import TOP, TWISTD

UNITS = TOP / "contrib" / "systemd"
SERVICE, SOCKET = UNITS / "cachesvc.service", UNITS / "cachesvc.socket"
SUPERVISOR = TOP / "contrib" / "supervisor" / "cachesvc.conf"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze (Debian's systemd) missing")
MAX_EXPOSURE = 3.0


def directives(path: Path) -> dict[str, list[str]]:
    """``{Section.Key: [values]}`` of a unit file (keys may repeat)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key}", []).append(value)
    return found


def test_service_essentials() -> None:
    d = directives(SERVICE)
    one = {k: v[-1] for k, v in d.items()}
    assert one["Service.Type"] == "notify" and one["Service.NotifyAccess"] == "main"
    assert one["Service.ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Service.Restart"] == "on-failure" and one["Service.RestartPreventExitStatus"] == "78"
    assert one["Service.WatchdogSec"] == "30s"
    assert "--pidfile= " in one["Service.ExecStart"] and " cachesvc --config " in one["Service.ExecStart"]
    assert one["Service.ProtectSystem"] == "strict" and one["Service.ReadWritePaths"] == "/cache"
    assert one["Service.PrivateTmp"] == one["Service.NoNewPrivileges"] == "yes"
    assert one["Service.CapabilityBoundingSet"] == one["Service.AmbientCapabilities"] == "CAP_DAC_OVERRIDE"
    assert d["Service.SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert "Service.PrivateUsers" not in one  # it would unmap www-data, and the capability with it
    assert one["Unit.Requires"] == "cachesvc.socket"


def test_socket_essentials() -> None:
    one = {k: v[-1] for k, v in directives(SOCKET).items()}
    assert one["Socket.ListenStream"] == "127.0.0.1:7836" and one["Socket.FileDescriptorName"] == "purge"
    assert one["Socket.Service"] == "cachesvc.service"
    assert "Unit.PartOf" not in one  # a restart of the service must leave the socket open


def test_supervisor_example() -> None:
    parser = configparser.ConfigParser(inline_comment_prefixes=(";",))
    parser.read(SUPERVISOR)
    program = parser["program:cachesvc"]
    assert program["command"].split()[1:5] == ["--nodaemon", "--pidfile=", "--logfile=-", "cachesvc"]
    assert "78" in program["exitcodes"].split(",") and program["autorestart"] == "unexpected"
    assert program["stopsignal"] == "TERM" and int(program["stopwaitsecs"]) >= 15


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """The units as systemd reads them; ExecStart must name an executable, so the copy names this one."""
    text = SERVICE.read_text()
    shipped = re.search(r"^ExecStart=(\S+)", text, re.M)
    assert shipped is not None
    (tmp_path / "cachesvc.service").write_text(text.replace(shipped.group(1), TWISTD[0]))
    shutil.copy(SOCKET, tmp_path / "cachesvc.socket")
    assert ANALYZE is not None
    done = subprocess.run([ANALYZE, "verify", str(tmp_path / "cachesvc.service"), str(tmp_path / "cachesvc.socket")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == "", done


@needs_analyze
def test_systemd_analyze_security_exposure() -> None:
    assert ANALYZE is not None
    done = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(SERVICE)],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for cachesvc\.service: (\d+\.\d)", done.stdout)
    assert found is not None, done
    exposure = float(found.group(1))
    assert exposure <= MAX_EXPOSURE, done.stdout
    assert f"exposure {exposure}" in SERVICE.read_text(), "the figure in the unit's header is stale"


def test_units_are_package_data() -> None:
    setup = configparser.ConfigParser()
    setup.read(TOP / "setup.cfg")
    files = " ".join(setup["options.data_files"].values())
    for path in (SERVICE, SOCKET, SUPERVISOR):
        assert str(path.relative_to(TOP)) in files
    assert "cachesvc.observe" in setup["options"]["packages"].split()
    assert "lua/*.lua" in setup["options.package_data"]["cachesvc.recache"]
