"""Soft purge of a whole zone (issue 10) against a tight loop doing the same system calls.

A zone laid out as nginx's ``levels=1:2`` holds ``--files`` real version-5 cache files (names = md5
of the key, the 336-byte header with ``valid_sec`` an hour ahead and ``date`` now, ``\\nKEY: ...\\n``
at 336, a stored FastCGI response, a 512-byte body). One ``twistd cachesvc`` (its zone listed in the
config) gets ``soft:<zone>``, and the round trip to its ``Purge: Success`` is timed. The reference is
a tight loop in a separate Python process on the same tree, descriptor-relative as the daemon's walk:
a scandir walk (``scandir(fd)``, ``open(name, dir_fd=...)``), then for each file
``open(O_RDWR|O_NOFOLLOW)``, read the header (one ``pread``), check the version and ``valid_sec``,
``pwrite`` 8 bytes at offset 8, close. Before every run (of either) every ``valid_sec`` is set an
hour ahead again and the dirty pages are synced; the runs alternate, the first of each only warms
the page cache. After the last daemon run every file's ``valid_sec`` must be in the past.

Target: the daemon's reply within 1.5 x the tight loop's time (median of ``--runs``).

    .venv/bin/python bench/soft_bench.py [--files 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from harness.daemon import Daemon, free_port  # noqa: E402
from harness.nginx import entry_bytes  # noqa: E402
from harness.nginxfiles import count_expired, make_fresh  # noqa: E402

HOST = "soft.example"
BODY = b"<html>" + b"x" * 499 + b"</html>"

TIGHT_LOOP = """
import os, struct, sys, time
FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
started = time.perf_counter()
now = time.time()
past = struct.pack("<q", int(now) - 1)
n = 0
def walk(dir_fd):
    global n
    with os.scandir(dir_fd) as it:
        entries = list(it)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            fd = os.open(entry.name, DIR, dir_fd=dir_fd)
            try:
                walk(fd)
            finally:
                os.close(fd)
        else:
            fd = os.open(entry.name, FLAGS, dir_fd=dir_fd)
            header = os.pread(fd, 4096, 0)
            version, valid = struct.unpack_from("<Qq", header)
            if version == 5 and valid >= now:
                os.pwrite(fd, past, 8)
                n += 1
            os.close(fd)
top = os.open(sys.argv[1], DIR)
walk(top)
os.close(top)
print(n, time.perf_counter() - started)
"""


def build(zone: Path, count: int) -> list[Path]:
    """*count* v5 cache files under *zone* at their nginx places; their paths."""
    paths = []
    now = int(time.time())
    for i in range(count):
        key = f"httpGET{HOST}/page/{i}/"
        digest = hashlib.md5(key.encode()).hexdigest()
        directory = zone / digest[-1] / digest[-3:-1]
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / digest
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, entry_bytes(key, BODY, valid_sec=now + 3600, date=now))
        os.close(fd)
        paths.append(path)
    return paths


def reset(paths: list[Path]) -> None:
    """Every entry fresh again (valid_sec an hour ahead), synced to disk."""
    make_fresh(paths)
    os.sync()


def tight_loop(zone: Path, count: int) -> float:
    out = subprocess.run([sys.executable, "-c", TIGHT_LOOP, str(zone)], capture_output=True, text=True, check=True)
    marked, seconds = out.stdout.split()
    assert int(marked) == count, f"the tight loop marked {marked} of {count}"
    return float(seconds)


def soft_purge(port: int, zone: Path) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(f"soft:{zone}\n".encode())
        reply = s.recv(512)
    seconds = time.perf_counter() - started
    assert reply == b"Purge: Success\n", reply
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each (after one warm-up run)")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="cachesvc-softbench-"))
    root = base / "cache"
    zone = root / HOST
    zone.mkdir(parents=True)
    port = free_port()
    conf = base / "bench.yaml"
    conf.write_text(
        f"purge:\n  listen: tcp:{port}:interface=127.0.0.1\n  roots: [{root}]\n"
        f"  zones:\n    - hosts: [{HOST}]\n      path: {root}/{{host}}\n"
    )
    print(f"soft purge benchmark on {sys.platform}, {len(os.sched_getaffinity(0))} cores")
    started = time.perf_counter()
    paths = build(zone, args.files)
    os.sync()
    print(f"built {args.files:,} v5 cache files in {time.perf_counter() - started:.1f} s")
    daemon = Daemon(["--config", str(conf)], base)
    try:
        daemon.wait_for_port(port)
        loop_s: list[float] = []
        daemon_s: list[float] = []
        for run in range(args.runs + 1):
            reset(paths)
            loop = tight_loop(zone, args.files)
            reset(paths)
            reply = soft_purge(port, zone)
            if run:  # the first of each warms the page cache and the daemon
                loop_s.append(loop)
                daemon_s.append(reply)
            print(f"  run {run}{' (warm-up)' if not run else ''}: tight loop {loop:.2f} s, daemon {reply:.2f} s")
        left = args.files - count_expired(paths)
        assert left == 0, f"{left} entries still fresh after the daemon's soft purge"
        ref, got = statistics.median(loop_s), statistics.median(daemon_s)
        ratio = got / ref
        print(f"\n{'':<36}{'seconds':>9}{'files/s':>11}")
        print(f"{'tight loop, separate process':<36}{ref:>9.2f}{args.files / ref:>11,.0f}")
        print(f"{'daemon soft:<zone> round trip':<36}{got:>9.2f}{args.files / got:>11,.0f}")
        print(
            f"ratio daemon / tight loop: {ratio:.2f} (target <= 1.5: {'MET' if ratio <= 1.5 else 'MISSED'}); "
            f"every valid_sec in the past afterwards: yes"
        )
    finally:
        daemon.stop()
        if os.environ.get("BENCH_KEEP_LOG"):
            shutil.copy(daemon.log_path, os.environ["BENCH_KEEP_LOG"])
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
