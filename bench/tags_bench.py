"""The tag index (issue 11): its cold build against the prefix scan, its memory, and a tag purge's reply time.

Zones laid out as nginx's ``levels=1:2`` hold ``--files`` real version-5 cache files each
(harness.nginxfiles.write_entry: the 336-byte header, ``\\nKEY: ...\\n``, a stored FastCGI response
whose ``X-Cache-Tags`` header names the entry's tags, a small body). Entry *i* carries the first *k*
of ``post-<i> term-<i % 500> author-<i % 50> archive-post hot|day-<i % 365>``: one tag of its own,
three shared ones, and ``hot``, carried by every tenth entry (10,000 of 100,000). One zone has
k = 5, one k = 1; a third is empty. Each ``twistd cachesvc`` run has one zone and
``purge.tags.enabled``.

1. Cold index: the seconds the daemon's ``tag index ready`` line reports for the k = 5 zone (its
   cold scan: every directory watched, every file's header region read), against the existing prefix
   scan over the same tree (``purge_prefixes`` with a prefix no key has, in a separate process: the
   same walk, reading each file's head). Runs alternate; the first of each warms the page cache.
   Target: <= 1.5 x the prefix scan (medians).
2. Memory: the daemon's RSS (VmRSS) once its index is ready, minus that of the daemon on the empty
   zone: g5 with k = 5, g1 with k = 1. Target: g5 <= E x (250 + 5 x 150), i.e. 1,000 bytes per entry
   at 5 tags. The growth is also split as g = E x (per entry + k x per pair): per pair = (g5 - g1) / 4E
   (what each further tag costs), per entry = g1 / E - per pair (the rest: the entry's name, its tuple,
   and its first tag, which is its own), shown beside 250 and 150.
3. Reply time of ``tag:<zone> hot`` (10,000 entries), soft then hard, through the daemon's port,
   from connect to ``Purge: Success``. Before each soft run every hot entry's ``valid_sec`` is set an
   hour ahead again; before each hard run the 10,000 entries are renamed into place again as nginx
   would (and the daemon is given 2 s to read their events). Afterwards every hot entry is expired
   (soft) or gone (hard) and every other entry is untouched. Target: <= 500 ms each (the worst run).

    .venv/bin/python bench/tags_bench.py [--files 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import re
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
from harness.nginxfiles import count_expired, entry_path, make_fresh, write_entry  # noqa: E402

READY = re.compile(r"tag index ready for (\S+): (\d+) entries, (\d+) tags \((\d+) entry-tag pairs\) in ([\d.]+) s")

PREFIX_SCAN = """
import sys, time
from cachesvc.purge.nginxcache import purge_prefixes
from cachesvc.purge.paths import PathPolicy
target = PathPolicy([sys.argv[1]]).target(sys.argv[2].encode())
started = time.perf_counter()
result = purge_prefixes(target, [b"httpGETno-such-host.example/"])
print(result.scanned, result.deleted, time.perf_counter() - started)
"""


def key(host: str, i: int) -> str:
    return f"httpGET{host}/page/{i}/"


def tags(i: int, k: int) -> str:
    hot = "hot" if i % 10 == 0 else f"day-{i % 365}"
    return " ".join([f"post-{i}", f"term-{i % 500}", f"author-{i % 50}", "archive-post", hot][:k])


def build(zone: Path, count: int, k: int) -> None:
    zone.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        write_entry(zone, key(zone.name, i), headers=f"X-Cache-Tags: {tags(i, k)}\r\n")


class Run:
    """One ``twistd cachesvc`` indexing *zone*; its ready line's figures and its RSS once ready."""

    def __init__(self, base: Path, root: Path, zone: Path) -> None:
        self.port = free_port()
        conf = base / f"bench-{time.monotonic_ns()}.yaml"
        conf.write_text(
            f"purge:\n  listen: tcp:{self.port}:interface=127.0.0.1\n  roots: [{root}]\n"
            f"  zones:\n    - hosts: [{zone.name}]\n      path: {zone}\n  tags:\n    enabled: true\n"
        )
        self.daemon = Daemon(["--config", str(conf)], base)
        try:
            self.daemon.wait_for_port(self.port, 60)
            deadline = time.monotonic() + 300
            while not (found := READY.search(self.daemon.log)):
                assert time.monotonic() < deadline, f"no tag index ready line:\n{self.daemon.log[-3000:]}"
                time.sleep(0.05)
            assert found.group(1) == str(zone), found.group(0)
            self.entries, self.distinct, self.pairs = (int(found.group(n)) for n in (2, 3, 4))
            self.seconds = float(found.group(5))
            time.sleep(1.0)  # the scan's lane and the reactor settle
            self.rss = rss(self.daemon.proc.pid)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.daemon.stop()


def rss(pid: int) -> int:
    """Resident bytes of process *pid*."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def prefix_scan(root: Path, zone: Path, count: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PREFIX_SCAN, str(root), str(zone)], capture_output=True, text=True, check=True,
        cwd=TOP,
    )
    scanned, deleted, seconds = out.stdout.split()
    assert (int(scanned), int(deleted)) == (count, 0), out.stdout
    return float(seconds)


def purge_line(port: int, line: str) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(line.encode() + b"\n")
        reply = s.recv(512)
    seconds = time.perf_counter() - started
    assert reply == b"Purge: Success\n", (line, reply)
    return seconds


def hot_paths(zone: Path, count: int) -> list[Path]:
    return [entry_path(zone, key(zone.name, i)) for i in range(0, count, 10)]


def restore(paths: list[Path], contents: list[bytes]) -> None:
    """The hot entries cached again, as nginx does: each written beside its place under a temp name, renamed."""
    for n, (path, data) in enumerate(zip(paths, contents, strict=True)):
        temp = path.with_name(f"{path.name}.{n:010d}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
        os.rename(temp, path)


def files_in(zone: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(zone))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each (after one warm-up run)")
    args = parser.parse_args()
    files, runs = args.files, args.runs

    base = Path(tempfile.mkdtemp(prefix="cachesvc-tagbench-"))
    root = base / "cache"
    zone5, zone1, empty = root / "five.example", root / "one.example", root / "empty.example"
    print(f"tag index benchmark on {sys.platform}, {len(os.sched_getaffinity(0))} cores, {files:,} entries a zone")
    try:
        started = time.perf_counter()
        build(zone5, files, 5)
        build(zone1, files, 1)
        empty.mkdir(parents=True)
        os.sync()
        print(f"built 2 x {files:,} v5 cache files in {time.perf_counter() - started:.1f} s")

        # 1. cold index against the prefix scan; RSS of each daemon once ready
        scan_s: list[float] = []
        index_s: list[float] = []
        rss5: list[int] = []
        for run in range(runs + 1):
            scan = prefix_scan(root, zone5, files)
            daemon = Run(base, root, zone5)
            daemon.stop()
            assert (daemon.entries, daemon.pairs) == (files, 5 * files), (daemon.entries, daemon.pairs)
            print(
                f"  run {run}{' (warm-up)' if not run else ''}: prefix scan {scan:.2f} s, "
                f"cold index {daemon.seconds:.2f} s ({daemon.entries:,} entries, {daemon.distinct:,} tags, "
                f"{daemon.pairs:,} pairs), RSS {daemon.rss / 2**20:.1f} MiB"
            )
            if run:
                scan_s.append(scan)
                index_s.append(daemon.seconds)
                rss5.append(daemon.rss)
        rss1: list[int] = []
        rss0: list[int] = []
        for _ in range(runs):
            for zone, into in ((zone1, rss1), (empty, rss0)):
                daemon = Run(base, root, zone)
                daemon.stop()
                into.append(daemon.rss)

        # 3. reply time of a tag purge of 10,000 entries, soft then hard
        hot = hot_paths(zone5, files)
        contents = [p.read_bytes() for p in hot]
        soft_s: list[float] = []
        hard_s: list[float] = []
        daemon = Run(base, root, zone5)
        try:
            for run in range(runs + 1):
                make_fresh(hot)
                time.sleep(0.5)
                soft = purge_line(daemon.port, f"soft:tag:{zone5} hot")
                left = len(hot) - count_expired(hot)
                assert left == 0, f"{left} hot entries still fresh after the soft tag purge"
                hard = purge_line(daemon.port, f"tag:{zone5} hot")
                gone = sum(not p.exists() for p in hot)
                assert gone == len(hot) and files_in(zone5) == files - len(hot), (gone, files_in(zone5))
                label = " (warm-up)" if not run else ""
                print(f"  run {run}{label}: soft {soft * 1000:.0f} ms, hard {hard * 1000:.0f} ms")
                if run:
                    soft_s.append(soft)
                    hard_s.append(hard)
                restore(hot, contents)
                time.sleep(2.0)
            log = daemon.daemon.log
        finally:
            daemon.stop()
        purge_lines = [x for x in log.splitlines() if "purge 'tag:" in x or "purge 'soft:tag:" in x]
        assert all("answered by the index" in x for x in purge_lines), purge_lines[:3]
    finally:
        shutil.rmtree(base, ignore_errors=True)

    ref, got = statistics.median(scan_s), statistics.median(index_s)
    ratio = got / ref
    print(f"\n1. cold index of {files:,} entries x 5 tags (medians of {runs})")
    print(f"{'':<44}{'seconds':>9}{'files/s':>11}")
    print(f"{'prefix scan (purge_prefixes, no match)':<44}{ref:>9.2f}{files / ref:>11,.0f}")
    print(f"{'cold index (the daemon: tag index ready)':<44}{got:>9.2f}{files / got:>11,.0f}")
    print(f"ratio cold index / prefix scan: {ratio:.2f} (target <= 1.5: {'MET' if ratio <= 1.5 else 'MISSED'})")

    g5 = statistics.median(rss5) - statistics.median(rss0)
    g1 = statistics.median(rss1) - statistics.median(rss0)
    per_pair = (g5 - g1) / (4 * files)
    per_entry = g1 / files - per_pair
    budget = files * (250 + 5 * 150)
    print(f"\n2. index memory: daemon RSS once ready, minus {statistics.median(rss0) / 2**20:.1f} MiB on an empty zone")
    print(f"{'':<36}{'MiB':>8}{'bytes/entry':>13}")
    print(f"{'k = 1 tag per entry':<36}{g1 / 2**20:>8.1f}{g1 / files:>13.0f}")
    print(f"{'k = 5 tags per entry':<36}{g5 / 2**20:>8.1f}{g5 / files:>13.0f}")
    print(f"{'budget at k = 5 (250 + 5 x 150)':<36}{budget / 2**20:>8.1f}{budget / files:>13.0f}")
    print(
        f"at 5 tags: {g5 / files:.0f} bytes per entry against 250 + 5 x 150 = 1,000 "
        f"(target: {'MET' if g5 <= budget else 'MISSED'})"
    )
    print(
        f"split (k = 1 and k = 5): {per_pair:.0f} bytes per further (entry, tag) pair (beside 150) + "
        f"{per_entry:.0f} bytes per entry (beside 250); the per-entry part holds the entry's own tag post-<i> "
        "(a string, a set and two dict slots of its own), which k = 1 already carries"
    )

    worst_soft, worst_hard = max(soft_s), max(hard_s)
    print(f"\n3. reply to tag:<zone> hot ({len(hot):,} entries), connect to Purge: Success, {runs} runs")
    print(f"{'':<12}{'median ms':>11}{'worst ms':>10}")
    print(f"{'soft':<12}{statistics.median(soft_s) * 1000:>11.0f}{worst_soft * 1000:>10.0f}")
    print(f"{'hard':<12}{statistics.median(hard_s) * 1000:>11.0f}{worst_hard * 1000:>10.0f}")
    met = worst_soft <= 0.5 and worst_hard <= 0.5
    print(f"target <= 500 ms each: {'MET' if met else 'MISSED'}; every hot entry expired (soft) then gone (hard), "
          "the others untouched, every purge answered by the index")


if __name__ == "__main__":
    main()
