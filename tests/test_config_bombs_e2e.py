"""Hostile config files against ``twistd ... cachesvc`` (issue 9, Major 6, and the minor item on readable secrets).

Each bomb must stop start-up within a few seconds, with exit status != 0, the message and no
traceback; the subprocess runs under an address-space limit, so a bomb that is not refused ends
in a MemoryError (a failure) rather than in the machine's swap. A secret in a file every user can
read is logged once the daemon runs, naming the file and ``chmod 600``.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path

import pytest

from harness.daemon import TOP, TWISTD, Daemon, free_port

SECONDS = 10.0
ADDRESS_SPACE = 2 * 1024**3
OUTPUT_BYTES = 8192
"""twistd prints its usage text (about 2 KB) and the message: a bomb's value is never printed whole."""


def laughs(indent: str = "  ") -> str:
    lines = [f"{indent}- &l0 [{', '.join(['lol'] * 9)}]"]
    lines += [f"{indent}- &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def start_up(tmp_path: Path, conf: Path, tac: bool = False) -> tuple[int, str, float]:
    """Start twistd on *conf* the way a user would; its exit status, output and seconds taken."""
    argv = [*TWISTD, "-n", "--pidfile=", "--logfile=-"]
    argv += ["-y", str(TOP / "cachesvc.tac")] if tac else ["cachesvc", "--config", str(conf)]
    env = {**os.environ, "CACHESVC_CONFIG": str(conf)}
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=SECONDS * 3,
                              preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"twistd still starting after {SECONDS * 3:.0f}s")
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace"), time.monotonic() - start


def eg_files(tmp_path: Path, hosts: str = "hosts:\n  - {id: 1, domain: a.example}\n", mode: int = 0o600) -> Path:
    (tmp_path / "hosts.d").mkdir(exist_ok=True)
    (tmp_path / "hosts.d" / "a.yaml").write_text(hosts)
    eg = tmp_path / "edge-gateway.yaml"
    eg.write_text("internal: {auth_key: secret-key}\nhosts: {include: hosts.d}\n")
    os.chmod(eg, mode)
    return eg


def cd_config(tmp_path: Path, api_port: int, extra: str = "") -> Path:
    conf = tmp_path / "cache-daemon.yaml"
    conf.write_text(
        "eg_config: edge-gateway.yaml\ndaemon_id: d\n"
        f"redis: {{addr: '127.0.0.1:{free_port()}'}}\n"  # nothing listens: the daemon starts all the same
        f"http_api: {{listen: '127.0.0.1:{api_port}'}}\n{extra}"
    )
    return conf


BOMBS = {
    "billion-laughs": ("daemon_id:\n" + laughs(), "aliases expand to more than 100,000 values"),
    "2-mib-file": (f"daemon_id: {'x' * (2 * 1024 * 1024)}\n", "2,097,164 bytes; the limit is 1,048,576 bytes"),
    "5000-digits": ("purge:\n  max_line_length: " + "9" * 5000 + "\n", "an integer of 5,000 characters is too long"),
    "5000-deep": ("daemon_id: " + "[" * 5000 + "]" * 5000 + "\n", "nest"),
    "long-value": (f"purge:\n  max_line_length: {'x' * 900_000}\n", "(900,000 characters)"),
}


@pytest.mark.parametrize("name", list(BOMBS))
@pytest.mark.parametrize("tac", [False, True], ids=["plugin", "tac"])
def test_a_config_bomb_is_refused_at_start_up(tmp_path: Path, name: str, tac: bool) -> None:
    text, message = BOMBS[name]
    conf = tmp_path / "cachesvc.yaml"
    conf.write_text(text)
    code, output, seconds = start_up(tmp_path, conf, tac)
    assert code != 0, output[-2000:]
    assert message in output and str(conf) in output, output[-2000:]
    assert "Traceback" not in output and "MemoryError" not in output, output[-4000:]
    assert len(output.encode()) < OUTPUT_BYTES, output[-2000:]
    assert seconds < SECONDS, f"refused after {seconds:.1f}s"


def test_an_eg_include_over_1_mib_is_refused_at_start_up(tmp_path: Path) -> None:
    eg_files(tmp_path, "hosts:\n" + "  - {id: 1, domain: a.example}\n" * 40_000)
    include = tmp_path / "hosts.d" / "a.yaml"
    conf = cd_config(tmp_path, free_port())
    code, output, seconds = start_up(tmp_path, conf)
    assert code != 0 and f"{include}: EG config file is {include.stat().st_size:,} bytes" in output, output[-2000:]
    assert "Traceback" not in output and seconds < SECONDS


def run_until_logged(tmp_path: Path, conf: Path, port: int, text: str) -> str:
    daemon = Daemon(["--config", str(conf)], tmp_path)
    try:
        daemon.wait_for_port(port)
        daemon.wait_for_log(text)
    finally:
        daemon.stop()
    return daemon.log


def test_a_world_readable_eg_config_with_the_auth_key_is_logged(tmp_path: Path) -> None:
    eg = eg_files(tmp_path, mode=0o644)
    port = free_port()
    conf = cd_config(tmp_path, port)
    os.chmod(conf, 0o644)  # holds no password: no warning of its own
    log = run_until_logged(tmp_path, conf, port, "chmod 600")
    lines = [line for line in log.splitlines() if "chmod 600" in line]
    assert len(lines) == 1, log
    assert f"{eg} holds internal.auth_key" in lines[0] and "secret-key" not in log


def test_an_eg_config_only_the_owner_reads_is_not_logged(tmp_path: Path) -> None:
    eg = eg_files(tmp_path, mode=0o600)
    port = free_port()
    conf = cd_config(tmp_path, port, extra="# and a Redis password, so one warning shows the log is written\n")
    conf.write_text(conf.read_text().replace("redis: {", "redis: {password: hunter2, "))
    os.chmod(conf, 0o644)
    log = run_until_logged(tmp_path, conf, port, "chmod 600")
    lines = [line for line in log.splitlines() if "chmod" in line]
    assert len(lines) == 1 and f"{conf} holds redis.password" in lines[0], log
    assert str(eg) not in log and "hunter2" not in log, log
