"""What ``twistd cachesvc`` says and how it exits before anything runs (cachesvc/tap.py, cachesvc.tac).

A configuration error, from the plugin or the ``.tac``, is one line on standard error and exit
status 78 (``EX_CONFIG``): no usage text, no traceback. ``--version`` is cachesvc's; ``--help``
tells of the recache half, the config file and where to read more. A mistyped option stays a
usage error (status 1).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cachesvc import __version__
from cachesvc.config import EX_CONFIG
from harness.daemon import TOP, TWISTD, Daemon, free_port


def twistd(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*TWISTD, "-n", "--pidfile=", *args]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, env=env)


def test_ex_config_is_78() -> None:
    assert EX_CONFIG == 78


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cache-root", "/definitely/missing"], "purge.roots[0]: '/definitely/missing' does not exist"),
        (["--purge-listen", "nonsense:1"], "is not a Twisted server endpoint"),
        (["--config", "/definitely/missing.yaml"], "cannot read config file /definitely/missing.yaml"),
    ],
)
def test_config_errors_are_one_line_and_78(tmp_path: Path, args: list[str], message: str) -> None:
    done = twistd("cachesvc", *args, cwd=tmp_path)
    assert done.returncode == 78, done
    assert done.stdout == "" and done.stderr.count("\n") == 1, done
    assert done.stderr.startswith("cachesvc: configuration error: ") and message in done.stderr


def test_a_bad_file_names_file_and_key(tmp_path: Path) -> None:
    conf = tmp_path / "bad.yaml"
    conf.write_text("purge:\n  idle_timout: 30s\n")
    done = twistd("cachesvc", "--config", str(conf), cwd=tmp_path)
    assert done.returncode == 78 and f"{conf}: purge.idle_timout: unknown configuration field" in done.stderr
    assert "Usage" not in done.stdout + done.stderr


def test_the_tac_exits_78_too(tmp_path: Path) -> None:
    conf = tmp_path / "bad.yaml"
    conf.write_text("metrics: {enabled: true}\npurge: {roots: [/definitely/missing]}\n")
    done = twistd("-y", str(TOP / "cachesvc.tac"), cwd=tmp_path, env={"CACHESVC_CONFIG": str(conf), "PATH": ""})
    assert done.returncode == 78, done
    assert "does not exist" in done.stderr and "Traceback" not in done.stdout + done.stderr


def test_a_mistyped_option_is_still_a_usage_error(tmp_path: Path) -> None:
    done = twistd("cachesvc", "--cache-rot", "/x", cwd=tmp_path)
    assert done.returncode == 1 and "option --cache-rot not recognized" in done.stdout


def test_version(tmp_path: Path) -> None:
    done = twistd("cachesvc", "--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith(f"cachesvc {__version__} (Twisted ")


def test_help(tmp_path: Path) -> None:
    done = twistd("cachesvc", "--help", cwd=tmp_path)
    text = " ".join(done.stdout.split())
    assert done.returncode == 0
    for words in ("recache daemon", "eg_config", "config file", "SIGHUP", "status 78",
                  f"{sys.prefix}/share/doc/cachesvc/README.md", "--cache-root", "--config"):
        assert words in text, words


def test_a_running_daemon_survives_sighup_with_exit_0_after(tmp_path: Path, cache_root: Path) -> None:
    """The start-up surprise of old: HUP killed the daemon with 129 and a stale pid file."""
    import signal

    port = free_port()
    daemon = Daemon(["--cache-root", str(cache_root), "--purge-listen", f"tcp:{port}:interface=127.0.0.1"], tmp_path)
    try:
        daemon.wait_for_port(port)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for_log("nothing to re-read")
        assert daemon.proc.poll() is None
        daemon.wait_for_port(port)
    finally:
        code = daemon.stop()
    assert code in (0, -signal.SIGTERM)
