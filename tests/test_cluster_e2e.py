"""Cluster purges end to end (issue 12): three ``twistd cachesvc`` daemons, three cache roots, one Redis.

Every node is a real daemon in a subprocess with ``purge.cluster`` pointing at a ``redis-server`` of
the test's own (harness/redis_server.py), which the fault tests kill and start again. The nodes have
different roots (they share one machine): A and C two roots each, B one, so a line below A's second
root is outside B's roots. Heartbeats are short (0.2 s) so that a node killed is not waited for
within a second; every other bound is generous.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis as redis_py

from harness.daemon import Daemon, free_port, purge, wait_until
from harness.nginxfiles import entry_path, valid_sec, write_entry
from harness.redis_server import RedisServer

OK = b"Purge: Success\n"
ERR = b"Purge: Error\n"
HEARTBEAT = 0.2
STREAM = "test:purge"
TAGS = "X-Cache-Tags: {}\r\n"


class Node:
    """One daemon of the cluster: its roots (the first holds the zones ``{root}/{host}``), port and runs."""

    def __init__(self, name: str, base: Path, roots: int, redis: str, tags: bool, wait: str) -> None:
        self.name = name
        self.base = base / name
        self.roots = [self.base / f"root{i + 1}" for i in range(roots)]
        for root in self.roots:
            root.mkdir(parents=True)
        self.port = free_port()
        self.conf = self.base / "cachesvc.yaml"
        self.conf.write_text(
            f"purge:\n  listen: tcp:{self.port}:interface=127.0.0.1\n"
            f"  roots: [{', '.join(str(r) for r in self.roots)}]\n"
            f"  zones:\n    - hosts: ['*']\n      path: {self.roots[0]}/{{host}}\n"
            f"  tags:\n    enabled: {'true' if tags else 'false'}\n"
            f"  cluster:\n    redis: {redis}\n    node: {name}\n    stream: {STREAM}\n"
            f"    wait: {wait}\n    retention: 1m\n    heartbeat: {int(HEARTBEAT * 1000)}ms\n"
        )
        self.runs: list[Daemon] = []

    def start(self) -> Daemon:
        daemon = Daemon(["--config", str(self.conf)], self.base)
        self.runs.append(daemon)
        return daemon

    @property
    def daemon(self) -> Daemon:
        return self.runs[-1]

    @property
    def log(self) -> str:
        """The log of the current run."""
        return self.daemon.log

    def zone(self, host: str, root: int = 0) -> Path:
        return self.roots[root] / host

    def send(self, line: str, timeout: float = 20.0) -> bytes:
        return purge(self.port, f"{line}\n".encode(), timeout=timeout)

    def kill(self) -> None:
        self.daemon.proc.send_signal(signal.SIGKILL)
        self.daemon.proc.wait(10)
        self.daemon.stop()

    def stop(self) -> None:
        for daemon in self.runs:
            daemon.stop()


class Cluster:
    def __init__(self, base: Path, roots: dict[str, int], tags: bool, wait: str = "2s") -> None:
        self.redis_server = RedisServer()
        self.redis_server.start()
        self.admin = redis_py.Redis(host="127.0.0.1", port=self.redis_server.port, socket_timeout=5)
        self.nodes = {name: Node(name, base, n, self.redis_server.addr, tags, wait) for name, n in roots.items()}

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            node.daemon.wait_for_port(node.port)
        self.wait_live(*self.nodes)

    def heartbeat(self, name: str) -> bool:
        return bool(self.admin.exists(f"{STREAM}:node:{name}"))

    def wait_live(self, *names: str) -> None:
        """Every node named beats, and every node has had several heartbeats since to see it."""
        wait_until(lambda: all(self.heartbeat(n) for n in names), 20, f"heartbeats of {names}")
        time.sleep(5 * HEARTBEAT)

    def wait_gone(self, name: str) -> None:
        """*name*'s heartbeat expired (3 heartbeats), and every other node has beaten since."""
        wait_until(lambda: not self.heartbeat(name), 20, f"{name}'s heartbeat to expire")
        time.sleep(5 * HEARTBEAT)

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.admin.close()
        self.redis_server.close()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(roots: dict[str, int] | None = None, tags: bool = False, start: bool = True, **kw: str) -> Cluster:
        cluster = Cluster(tmp_path, roots or {"A": 2, "B": 1, "C": 2}, tags, **kw)
        made.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One three-node cluster (tags on) for the tests that purge without breaking anything."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), {"A": 2, "B": 1, "C": 2}, tags=True)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


ALL = ("A", "B", "C")


def entries(cluster: Cluster, host: str, keys: list[str], headers: str = "", root: int = 0,
            names: tuple[str, ...] = ALL) -> dict[str, list[Path]]:
    """A cache entry for each key in *host*'s zone on each node: {node: [path per key]}."""
    return {n: [write_entry(cluster[n].zone(host, root), k, headers=headers) for k in keys] for n in names}


def land(zone: Path, key: str, tags: str) -> Path:
    """As nginx stores an entry: written under a temp name, then renamed into place (what inotify sees)."""
    staged = write_entry(zone.parent / ".staging" / zone.name, key, headers=TAGS.format(tags))
    path = entry_path(zone, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staged, path)
    return path


def relative(node: Node, path: Path) -> str:
    return str(path.relative_to(node.roots[0]))


def exists(paths: dict[str, list[Path]]) -> dict[str, list[bool]]:
    return {n: [p.exists() for p in ps] for n, ps in paths.items()}


# --- every form, on every node, before the reply ------------------------------------------------


def test_a_path_purge_removes_the_entry_on_every_node_before_the_reply(shared: Cluster) -> None:
    paths = entries(shared, "path.example", ["httpGETpath.example/victim", "httpGETpath.example/other"])
    line = f"{shared['A'].roots[0]}/{relative(shared['A'], paths['A'][0])}"
    assert shared["A"].send(line) == OK
    assert exists(paths) == {n: [False, True] for n in ALL}
    wanted = {n: f"{shared[n].roots[0]}/{relative(shared['A'], paths['A'][0])}" for n in ALL}
    for n in ("B", "C"):  # each applied it below its own root, with its own path policy
        wait_until(lambda n=n: f"purge '{wanted[n]}' deleted" in shared[n].log, 5, f"{n}'s purge line")


def test_a_url_purge_removes_the_entry_on_every_node_before_the_reply(shared: Cluster) -> None:
    paths = entries(shared, "url.example", ["httpGETurl.example/post/", "httpGETurl.example/keep/"])
    assert shared["A"].send("http://url.example/post/") == OK
    assert exists(paths) == {n: [False, True] for n in ALL}


def test_a_prefix_purge_removes_the_entries_on_every_node_before_the_reply(shared: Cluster) -> None:
    keys = ["httpGETprefix.example/blog/1", "httpGETprefix.example/blog/2/x", "httpGETprefix.example/shop/1"]
    paths = entries(shared, "prefix.example", keys)
    assert shared["A"].send("http://prefix.example/blog/*") == OK
    assert exists(paths) == {n: [False, False, True] for n in ALL}


def test_a_soft_purge_marks_the_entry_expired_on_every_node_before_the_reply(shared: Cluster) -> None:
    paths = entries(shared, "soft.example", ["httpGETsoft.example/page"])
    line = f"soft:{shared['A'].roots[0]}/{relative(shared['A'], paths['A'][0])}"
    assert shared["A"].send(line) == OK
    now = time.time()
    assert {n: (ps[0].exists(), valid_sec(ps[0]) <= now) for n, ps in paths.items()} == {n: (True, True) for n in ALL}


def test_a_hard_prefix_purge_sent_to_b_reaches_a_and_c(shared: Cluster) -> None:
    paths = entries(shared, "hard.example", ["httpGEThard.example/a", "httpGEThard.example/b"])
    assert shared["B"].send(f"hard:{shared['B'].zone('hard.example')}") == OK  # a whole zone, from B
    assert exists(paths) == {n: [False, False] for n in ALL}
    assert all(shared[n].zone("hard.example").is_dir() for n in ALL)  # emptied, kept


def test_a_tag_purge_removes_the_tagged_entries_on_every_node_before_the_reply(shared: Cluster) -> None:
    tagged = {n: [land(shared[n].zone("tags.example"), f"httpGETtags.example/{i}", t)
                  for i, t in enumerate(["t1", "t1 t2", "t2", "t3"])] for n in ALL}
    assert shared["A"].send(f"tag:{shared['A'].zone('tags.example')} t1") == OK
    assert exists(tagged) == {n: [False, False, True, True] for n in ALL}
    assert shared["C"].send(f"soft:tag:{shared['C'].zone('tags.example')} t2") == OK
    now = time.time()
    assert {n: valid_sec(ps[2]) <= now and valid_sec(ps[3]) > now for n, ps in tagged.items()} == \
        {n: True for n in ALL}


def test_a_line_outside_bs_roots_fails_on_b_only(shared: Cluster) -> None:
    """Below A's second root: B has one root, so the line stays outside it; C follows below its second."""
    paths = entries(shared, "second.example", ["httpGETsecond.example/x"], root=1, names=("A", "C"))
    line = str(paths["A"][0])
    assert shared["A"].send(line) == ERR
    assert exists(paths) == {"A": [False], "C": [False]}
    wait_until(lambda: re.search(rf"cluster purge '{re.escape(line)}': failed on B; answered Purge: Error "
                                 r"\(purged here\)", shared["A"].log), 5, "A's log naming B")
    assert "refused: outside every cache root" in shared["B"].log


def test_a_line_every_node_refuses_is_not_sent(shared: Cluster) -> None:
    before = shared.admin.xlen(STREAM)
    assert shared["A"].send("/etc/passwd") == ERR
    assert shared["A"].send(f"{shared['A'].roots[0]}/../etc") == ERR
    assert shared.admin.xlen(STREAM) == before


# --- a node down, Redis down, the stream trimmed --------------------------------------------------


def test_a_node_killed_catches_up_before_it_reports_live_and_applies_each_purge_once(make_cluster) -> None:
    cluster = make_cluster()
    keys = [f"httpGETkill.example/{i}" for i in range(100)]
    paths = entries(cluster, "kill.example", keys)
    cluster["C"].kill()
    cluster.wait_gone("C")
    replies = [cluster["AB"[i % 2]].send(f"{cluster['AB'[i % 2]].roots[0]}/{relative(cluster['A'], paths['A'][i])}")
               for i in range(100)]
    assert replies == [OK] * 100
    assert exists(paths) == {"A": [False] * 100, "B": [False] * 100, "C": [True] * 100}
    c = cluster["C"]
    daemon = c.start()
    daemon.wait_for_port(c.port, timeout=30)
    # A purge sent to C as soon as it listens is answered once C has caught up: all gone by the reply.
    assert c.send(f"{c.roots[0]}/nothing-here/x") == OK
    assert [p.exists() for p in paths["C"]] == [False] * 100
    # Live is its heartbeat in Redis: it beats only once every purge it missed is applied.
    wait_until(lambda: cluster.heartbeat("C") or daemon.proc.poll() is not None, 30, "C's heartbeat")
    assert re.search(r"cluster: applied 100 purges missed since \d+-\d+", c.log), c.log
    assert c.log.index("cluster: applied 100 purges missed") < c.log.index(f"purge '{c.roots[0]}/nothing-here/x'")
    counts = {str(p): c.log.count(f"purge '{p}' ") for p in paths["C"]}
    assert counts == {str(p): 1 for p in paths["C"]}, "applied twice (or not at all) on C"
    # Back in the cluster: A waits for C again.
    cluster.wait_live("C")
    more = entries(cluster, "kill.example", ["httpGETkill.example/after"])
    assert cluster["A"].send(str(more["A"][0])) == OK
    assert exists(more) == {n: [False] for n in ALL}


def test_a_node_restarted_opens_its_purge_port_only_once_it_has_caught_up(make_cluster) -> None:
    """The issue: "applies every later entry before it opens its purge port and reports itself live"."""
    cluster = make_cluster()
    keys = [f"httpGETport.example/{i}" for i in range(100)]
    paths = entries(cluster, "port.example", keys)
    cluster["C"].kill()
    cluster.wait_gone("C")
    assert [cluster["A"].send(str(p)) for p in paths["A"]] == [OK] * 100
    c = cluster["C"]
    c.start().wait_for_port(c.port, timeout=30)
    left = sum(p.exists() for p in paths["C"])
    assert left == 0, f"C accepted connections on its purge port with {left} of the 100 missed purges not applied"


def test_redis_killed_and_restarted_mid_stream(make_cluster) -> None:
    """C is paused while A and B purge (the stream holds what C has not read); Redis dies; C resumes.

    Redis keeps the stream across its restart (SAVE, then SIGKILL: the restarted server loads the
    dump), as a Redis with persistence would. Nothing it held is lost for C; purges during the outage
    are done locally and answered Purge: Error; afterwards the cluster purges as before.
    """
    cluster = make_cluster()
    a, b, c = cluster["A"], cluster["B"], cluster["C"]
    held = entries(cluster, "outage.example", [f"httpGEToutage.example/held/{i}" for i in range(10)])
    during = entries(cluster, "outage.example", [f"httpGEToutage.example/during/{i}" for i in range(4)])
    c.daemon.proc.send_signal(signal.SIGSTOP)
    try:
        cluster.wait_gone("C")
        assert [a.send(str(p)) for p in held["A"]] == [OK] * 10
        assert exists(held) == {"A": [False] * 10, "B": [False] * 10, "C": [True] * 10}
        cluster.admin.save()
        cluster.redis_server.stop()  # SIGKILL
    finally:
        c.daemon.proc.send_signal(signal.SIGCONT)
    replies = [a.send(str(during["A"][0])), b.send(str(during["B"][1])), a.send(str(during["A"][2])),
               b.send(str(during["B"][3]))]
    assert replies == [ERR] * 4
    assert exists(during)["A"][0::2] == [False, False] and exists(during)["B"][1::2] == [False, False]
    for node in (a, b):
        wait_until(lambda node=node: "is unreachable" in node.log, 10, f"{node.name}'s outage line")
    cluster.redis_server.start()
    wait_until(lambda: not any(p.exists() for p in held["C"]), 30, "C to apply what the stream held")
    for node in (a, b, c):
        wait_until(lambda node=node: "answers again" in node.log, 30, f"{node.name}'s 'answers again' line")
        assert node.log.count("is unreachable") == 1, f"{node.name} logged its outage more than once"
    cluster.wait_live(*ALL)
    after = entries(cluster, "outage.example", ["httpGEToutage.example/after"])
    assert b.send(str(after["B"][0])) == OK
    assert exists(after) == {n: [False] for n in ALL}
    counts = {str(p): c.log.count(f"purge '{p}' ") for p in held["C"]}
    assert counts == {str(p): 1 for p in held["C"]}


def missed_while_down(cluster: Cluster) -> dict[str, list[Path]]:
    """C applies one purge (its position is a real id), stops; A purges five entries C does not see."""
    a, c = cluster["A"], cluster["C"]
    first = entries(cluster, "trim.example", ["httpGETtrim.example/first"])
    assert a.send(str(first["A"][0])) == OK and exists(first) == {n: [False] for n in ALL}
    c.daemon.stop()  # SIGTERM: its position is the last entry it applied
    cluster.wait_gone("C")
    missed = entries(cluster, "trim.example", [f"httpGETtrim.example/{i}" for i in range(5)])
    assert [a.send(str(p)) for p in missed["A"]] == [OK] * 5
    return missed


def assert_full_purge_on_c(cluster: Cluster, missed: dict[str, list[Path]]) -> None:
    """C restarted purges every zone of both its roots once, hard, says so, and follows the cluster again."""
    a, b, c = cluster["A"], cluster["B"], cluster["C"]
    # What C holds that no purge named: every zone of both its roots; and the other nodes' alike.
    kept = entries(cluster, "untouched.example", ["httpGETuntouched.example/1"])
    second = entries(cluster, "root2.example", ["httpGETroot2.example/1"], root=1, names=("A", "C"))
    c.start().wait_for_port(c.port)
    c.daemon.wait_for_log("purging every zone here once, hard", 20)
    wait_until(lambda: not any(p.exists() for ps in (missed["C"], kept["C"], second["C"]) for p in ps), 20,
               "C's zones purged")
    assert c.log.count("purging every zone here once, hard") == 1
    for zone in (c.zone("trim.example"), c.zone("untouched.example"), c.zone("root2.example", 1)):
        wait_until(lambda zone=zone: f"purge 'hard:{zone}'" in c.log, 10, f"C's purge of {zone}")
        assert zone.is_dir()  # emptied, kept
    assert kept["A"][0].exists() and kept["B"][0].exists() and second["A"][0].exists()
    assert "purging every zone" not in a.log + b.log
    cluster.wait_live(*ALL)
    after = entries(cluster, "trim.example", ["httpGETtrim.example/after"])
    assert a.send(str(after["A"][0])) == OK
    assert exists(after) == {n: [False] for n in ALL}


def test_a_node_whose_position_was_trimmed_purges_every_zone_once(make_cluster) -> None:
    """Trimmed as retention trims (XADD ... MINID ~, here XTRIM MINID): the entries after C's position are gone."""
    cluster = make_cluster()
    missed = missed_while_down(cluster)
    newest = cluster.admin.xrevrange(STREAM, count=1)[0][0].decode()
    ms, seq = (int(x) for x in newest.split("-"))
    assert cluster.admin.xtrim(STREAM, minid=f"{ms}-{seq + 1}", approximate=False) >= 5
    assert cluster.admin.xlen(STREAM) == 0
    assert_full_purge_on_c(cluster, missed)


def test_a_node_whose_missed_entries_were_deleted_purges_every_zone_once(make_cluster) -> None:
    """The same with the entries removed by XDEL (which Redis records as the stream's max-deleted-entry-id)."""
    cluster = make_cluster()
    missed = missed_while_down(cluster)
    ids = [entry_id for entry_id, _ in cluster.admin.xrange(STREAM)]
    assert cluster.admin.xdel(STREAM, *ids) == len(ids) >= 6
    assert_full_purge_on_c(cluster, missed)


def test_a_node_that_missed_nothing_does_not_purge_everything_after_a_trim(make_cluster) -> None:
    cluster = make_cluster()
    a, b = cluster["A"], cluster["B"]
    done = entries(cluster, "trimmed.example", [f"httpGETtrimmed.example/{i}" for i in range(3)])
    assert [a.send(str(p)) for p in done["A"]] == [OK] * 3
    kept = entries(cluster, "kept.example", ["httpGETkept.example/1"])
    assert cluster.admin.xtrim(STREAM, maxlen=0, approximate=False) >= 3  # B's own position among them
    b.daemon.stop()
    b.start().wait_for_port(b.port)
    cluster.wait_live(*ALL)
    assert "purging every zone" not in b.log and kept["B"][0].exists()
    after = entries(cluster, "kept.example", ["httpGETkept.example/after"])
    assert b.send(str(after["B"][0])) == OK
    assert exists(after) == {n: [False] for n in ALL} and kept["B"][0].exists()


def test_redis_unreachable_at_start_opens_the_port_and_catches_up_once_it_answers(make_cluster) -> None:
    cluster = make_cluster(start=False)
    cluster.redis_server.stop()
    for node in cluster.nodes.values():
        node.start()
    for node in cluster.nodes.values():
        node.daemon.wait_for_port(node.port, timeout=30)
    paths = entries(cluster, "cold.example", ["httpGETcold.example/x"])
    assert cluster["A"].send(str(paths["A"][0])) == ERR  # purged here, not confirmed by the cluster
    assert exists(paths) == {"A": [False], "B": [True], "C": [True]}
    cluster.redis_server.start()
    cluster.wait_live(*ALL)
    later = entries(cluster, "cold.example", ["httpGETcold.example/y"])
    assert cluster["A"].send(str(later["A"][0])) == OK
    assert exists(later) == {n: [False] for n in ALL}


def test_a_slow_purge_being_applied_does_not_hold_up_the_acknowledgements_of_others(make_cluster) -> None:
    """B applies a long soft purge from A; meanwhile a purge B received is acknowledged by A and C at once.

    B reads the purges and the acknowledgements on one loop: while it applies an entry it reads no
    acknowledgement, so its own reply must not wait for that apply.
    """
    cluster = make_cluster(wait="300ms")
    a, b = cluster["A"], cluster["B"]
    big = b.zone("big.example")
    for i in range(60_000):
        d = big / f"{i % 16:x}" / f"{(i // 16) % 256:02x}"
        if i < 4096:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:032x}").write_bytes(b"\0" * 400)
    quick = entries(cluster, "quick.example", ["httpGETquick.example/x"])
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(a.send, f"soft:{a.zone('big.example')}")
        wait_until(lambda: any(b"big.example" in f[b"line"] for _, f in cluster.admin.xrange(STREAM)), 5, "XADD")
        time.sleep(0.1)  # B is reading it
        started = time.monotonic()
        reply = b.send(str(quick["B"][0]))
        took = time.monotonic() - started
        slow.result(60)
    line = wait_until(lambda: re.search(r"purge 'soft:\S+big.example' \w+.*, ([\d.]+) ms", b.log), 60, "B's line")
    print(f"B applied the soft purge in {float(line.group(1)):.0f} ms; its own purge was answered in {took:.3f} s")
    # Longer than twice the 300 ms wait: acknowledgements held behind it would have made B answer Error.
    assert float(line.group(1)) > 600, "the slow purge was not slow enough to show anything"
    assert exists(quick) == {n: [False] for n in ALL}
    assert reply == OK, f"B answered {reply!r} after {took:.2f} s: A and C acknowledged at once, B did not read it"
