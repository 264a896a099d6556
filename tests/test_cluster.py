"""Cluster purges in-process (issue 12): acknowledgements, stream ids, lines moved between roots, the config.

Deterministic: ``Clock`` for every wait, a real ``Purger`` (with a deleter that records what it is
asked to delete) as a node's own purge, and, for the ``Cluster`` service's logic, a recorder that
answers each Redis command at once. Real Redis, real sockets and real daemons are in
tests/test_cluster_e2e.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from cachesvc import config
from cachesvc.configfile import ConfigError
from cachesvc.purge import clusterio
from cachesvc.purge.cluster import Cluster
from cachesvc.purge.clusterconfig import ClusterConfig, ClusterSettings, check_cluster
from cachesvc.purge.clusterio import KEPT_ACKS, Acks, Keys, newer, rebase, root_of, split_path
from cachesvc.purge.deleter import Deleted
from cachesvc.purge.paths import PathPolicy, PurgeTarget
from cachesvc.purge.purger import Purger

# --- acknowledgements ------------------------------------------------------------------------------


def ack(entry: str, node: str, ok: bool = True) -> dict[bytes, bytes]:
    return {b"id": entry.encode(), b"node": node.encode(), b"ok": b"1" if ok else b"0"}


def fired(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_acks_fire_once_every_expected_node_answered() -> None:
    clock = Clock()
    acks = Acks(clock)
    result = fired(acks.expect(b"5-0", {"B", "C"}, 2.0))  # the id as XADD's reply gives it: bytes
    acks.record(ack("5-0", "B"))
    assert result == []
    acks.record(ack("5-0", "C", ok=False))
    assert result == [{"B": True, "C": False}] and clock.getDelayedCalls() == []  # the deadline is cancelled


def test_acks_that_arrive_before_expect_are_kept() -> None:
    """An ack may be read before XADD's own reply reaches the publisher."""
    clock = Clock()
    acks = Acks(clock)
    acks.record(ack("7-0", "B"))
    acks.record(ack("7-0", "C"))
    assert fired(acks.expect("7-0", {"B", "C"}, 2.0)) == [{"B": True, "C": True}] and not clock.getDelayedCalls()
    acks.record(ack("8-0", "B"))  # one early, one late
    result = fired(acks.expect("8-0", {"B", "C"}, 2.0))
    assert result == []
    acks.record(ack("8-0", "C"))
    assert result == [{"B": True, "C": True}]


def test_acks_time_out_with_those_that_came() -> None:
    clock = Clock()
    acks = Acks(clock)
    result = fired(acks.expect("9-0", {"B", "C"}, 2.0))
    acks.record(ack("9-0", "B"))
    clock.advance(1.99)
    assert result == []
    clock.advance(0.01)
    assert result == [{"B": True}] and clock.getDelayedCalls() == []
    acks.record(ack("9-0", "C"))  # too late: harmless
    assert result == [{"B": True}]


def test_acks_of_other_entries_or_nodes_do_not_count() -> None:
    clock = Clock()
    acks = Acks(clock)
    result = fired(acks.expect("3-0", {"B"}, 1.0))
    acks.record(ack("3-1", "B"))  # another entry
    acks.record(ack("3-0", "Z"))  # a node not waited for
    assert result == []
    acks.record({b"id": b"3-0", b"node": b"B", b"ok": b"yes"})  # anything but "1" is a failure
    assert result == [{"B": False}]


def test_no_live_node_means_no_wait_and_abandon_fires_every_waiting_purge() -> None:
    clock = Clock()
    acks = Acks(clock)
    assert fired(acks.expect("0-1", set(), 2.0)) == [{}] and clock.getDelayedCalls() == []
    first, second = fired(acks.expect("1-0", {"B"}, 2.0)), fired(acks.expect("2-0", {"B", "C"}, 2.0))
    acks.record(ack("2-0", "C"))
    acks.abandon()
    assert (first, second) == ([{}], [{"C": True}])
    assert clock.getDelayedCalls() == []


def test_early_acks_are_bounded() -> None:
    clock = Clock()
    acks = Acks(clock)
    for i in range(KEPT_ACKS + 10):  # acks of other nodes' entries, which nobody here waits for
        acks.record(ack(f"{i}-0", "B"))
    assert len(acks._early) == KEPT_ACKS
    assert fired(acks.expect(f"{KEPT_ACKS + 9}-0", {"B"}, 1.0)) == [{"B": True}]  # the newest are kept ...
    oldest = fired(acks.expect("0-0", {"B"}, 1.0))  # ... the oldest dropped
    clock.advance(1.0)
    assert oldest == [{}]


# --- stream ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, expected",
    [("1-0", "0-0", True), ("0-0", "1-0", False), ("5-0", "5-0", False), ("10-0", "9-9", True),
     ("5-10", "5-9", True), ("5-9", "5-10", False), ("1700000000000-0", "999999999999-5", True),
     ("0-0", "", False), ("1-0", "", True), ("junk", "0-0", False), ("7", "6-99", True)],
)
def test_newer_compares_stream_ids_as_numbers(a: str, b: str, expected: bool) -> None:
    assert newer(a, b) is expected


def test_keys_fields_and_text() -> None:
    keys = Keys("cp", "web-1")
    assert (keys.stream, keys.acks, keys.members, keys.heartbeat, keys.position, keys.heartbeat_of("web-2")) == (
        "cp", "cp:acks", "cp:members", "cp:node:web-1", "cp:pos:web-1", "cp:node:web-2")
    assert clusterio.fields([b"node", b"A", b"line", b"/x"]) == {b"node": b"A", b"line": b"/x"}
    assert clusterio.fields([b"odd"]) == {}
    assert (clusterio.text(None), clusterio.text(b"1-0"), clusterio.text(3)) == ("", "1-0", "3")


# --- lines between roots ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, parts",
    [(b"/c/site/x", (b"", b"/c/site/x", b"")), (b"soft:/c/site/x", (b"soft:", b"/c/site/x", b"")),
     (b"hard:/c/site", (b"hard:", b"/c/site", b"")), (b"tag:/c/s t1,t2 t3", (b"tag:", b"/c/s", b" t1,t2 t3")),
     (b"soft:tag:/c/s t1", (b"soft:tag:", b"/c/s", b" t1")), (b"hard:tag:/c/s", (b"hard:tag:", b"/c/s", b"")),
     (b"http://site.example/x", None), (b"soft:https://site.example/*", None), (b"tag:site t1", None),
     (b"relative/x", None), (b"", None), (b"soft:soft:/c/x", None), (b"tag:http://x/ t1", None)],
)
def test_split_path(line: bytes, parts: tuple[bytes, bytes, bytes] | None) -> None:
    assert split_path(line) == parts


def test_root_of_is_the_longest_root_the_path_is_below() -> None:
    roots = ("/cache", "/cache/inner", "/other")
    assert [root_of(p, roots) for p in (b"/cache/site/x", b"/cache/inner/site", b"/other/site")] == [0, 1, 2]
    # a root itself, a name that merely starts like a root, elsewhere
    assert [root_of(p, roots) for p in (b"/cache", b"/cache-evil/site", b"/elsewhere/x")] == [None] * 3


@pytest.mark.parametrize(
    "line, expected",
    [(b"/a1/site/x", b"/b1/site/x"), (b"soft:/a1/site/x", b"soft:/b1/site/x"), (b"hard:/a1/s", b"hard:/b1/s"),
     (b"tag:/a1/site t1,t2", b"tag:/b1/site t1,t2"), (b"soft:tag:/a1/s t1", b"soft:tag:/b1/s t1"), (b"/a1/", b"/b1/"),
     (b"http://site.example/x", b"http://site.example/x"),  # URLs: every node maps them through its zones
     (b"/a1-evil/site", b"/a1-evil/site"),  # not below the origin's root: left as it is
     (b"/elsewhere/x", b"/elsewhere/x")],
)
def test_rebase_moves_the_path_to_this_nodes_root_of_the_same_index(line: bytes, expected: bytes) -> None:
    assert rebase(line, b"/a1", 0, ("/b1", "/b2")) == expected


def test_rebase_leaves_lines_alone_for_nodes_with_the_same_roots_or_no_such_root() -> None:
    assert rebase(b"/a1/site/x", b"/a1", 0, ("/a1",)) == b"/a1/site/x"
    assert rebase(b"/a2/site/x", b"/a2", 1, ("/b1",)) == b"/a2/site/x"  # B has one root: stays outside it
    assert rebase(b"/a2/site/x", b"/a2", 1, ("/b1", "/b2")) == b"/b2/site/x"


POLICY_ROOTS = ("/b1", "/b2")

POISONED = [
    # (line, origin root field, root_index): what anyone who can write to the stream may send
    (b"/a1/../../etc/passwd", b"/a1", 0), (b"/a1/site/../../../etc", b"/a1", 0),
    (b"soft:/a1/./site/../..", b"/a1", 0), (b"tag:/a1/.. t1", b"/a1", 0),
    (b"/a1/site/x", b"/a1", 2), (b"/a1/site/x", b"/a1", 10**9),  # no such root here
    (b"/a1/site/x", b"/a1", 1),  # the other root of this node: still inside it
    (b"/cache-evil/x", b"/cache", 0),  # a root field that is a prefix of the path's first name
    (b"/cache/x", b"/cache-evil", 0),
    (b"/etc/passwd", b"", 0),  # an empty root field: every absolute path is "below" it
    (b"/etc/passwd", b"/", 0), (b"//etc/passwd", b"/", 0), (b"/etc/passwd", b"/etc", 0),
    (b"/b1/../etc", b"/b1/..", 0), (b"/b1/../../etc", b"/b1", 0), (b"/a1/site\0/x", b"/a1", 0),
    (b"/b1", b"/b1", 0),  # a root itself
    (b"/a1/.cachesvc-trash/x", b"/a1", 0),  # this node's trash, once rebased
]


# --- the Cluster service's logic, with a recorder for Redis -----------------------------------------


class Recorder:
    """Answers every Redis command at once (XADD with an id) and remembers it."""

    calls: list[tuple[Any, ...]]

    def __init__(self) -> None:
        self.calls = []

    def call(self, command: str, *args: Any) -> Deferred[Any]:
        self.calls.append((command, *args))
        return succeed(b"1000-0" if command == "XADD" else b"OK")

    def of(self, command: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == command]


class RecordingDeleter:
    def __init__(self) -> None:
        self.targets: list[PurgeTarget] = []

    def delete(self, target: PurgeTarget, harvest: object = None) -> Deferred[Deleted]:
        self.targets.append(target)
        return succeed(Deleted("deleted", 1))


class Lane:
    """Stands in for a WorkerThread: keeps what is submitted; :meth:`run` runs it, firing its Deferred."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def submit(self, job: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((job, d))
        return d

    def run(self) -> None:
        jobs, self.jobs = self.jobs, []
        for job, d in jobs:
            d.callback(job())


def node(roots: tuple[str, ...] = POLICY_ROOTS, max_line: int = 4096, **kw: Any) -> Any:
    """A Cluster of node B (or ``node=``) with a real Purger over *roots*; its Redis the recorder, its lane a Lane."""
    settings = dict(host="127.0.0.1", port=6379, password="", db=0, node="B", stream="s", wait=2.0,
                    retention=86400.0, heartbeat=1.0)
    clock, deleter, recorder = Clock(), RecordingDeleter(), Recorder()
    purger = Purger(PathPolicy(roots, trash=f"{roots[0]}/.cachesvc-trash"), deleter, clock)
    cluster = Cluster(purger, ClusterSettings(**{**settings, **kw}), roots, clock, max_line, Lane())  # type: ignore[arg-type]
    cluster.redis = recorder  # type: ignore[assignment]
    return cluster, recorder, deleter, clock


def applied(cluster: Cluster, entry: str, **values: bytes) -> int:
    result = fired(cluster._apply(entry, {k.encode(): v for k, v in values.items()}))
    assert len(result) == 1 and isinstance(result[0], int), result
    return int(result[0])


def test_an_entry_from_another_node_is_applied_below_this_nodes_root_and_acknowledged() -> None:
    cluster, redis, deleter, _ = node()
    assert applied(cluster, "5-0", node=b"A", line=b"soft:/a1/site/x", root=b"/a1", root_index=b"0") == 1
    assert deleter.targets == []  # soft: no scanner in this Purger, so it is refused, and says so
    assert applied(cluster, "6-0", node=b"A", line=b"/a1/site/x", root=b"/a1", root_index=b"0") == 1
    assert deleter.targets == [PurgeTarget("/b1", ("site", "x"))]
    assert redis.of("XADD") == [
        ("XADD", "s:acks", "MAXLEN", "~", 100_000, "*", "id", "5-0", "node", "B", "ok", "0"),
        ("XADD", "s:acks", "MAXLEN", "~", 100_000, "*", "id", "6-0", "node", "B", "ok", "1"),
    ]
    assert redis.of("SET")[-1] == ("SET", "s:pos:B", "6-0") and cluster._position == "6-0"


def test_an_entry_this_node_published_is_not_applied_again() -> None:
    cluster, redis, deleter, _ = node()
    assert applied(cluster, "7-0", node=b"B", line=b"/b1/site/x", root=b"/b1", root_index=b"0") == 0
    assert deleter.targets == [] and redis.of("XADD") == []
    assert redis.of("SET") == [("SET", "s:pos:B", "7-0")]


def test_purging_every_zone_lists_them_on_the_injected_lane(tmp_path: Path) -> None:
    """After missed entries were trimmed: the zones are listed on the lane PurgeService gives (never the
    reactor's thread pool), then each is purged, hard."""
    root = tmp_path / "cache"
    for name in ("b.example", "a.example", ".cachesvc-trash", ".hidden"):
        (root / name).mkdir(parents=True)
    (root / "file").write_bytes(b"")
    (root / "link").symlink_to(root / "a.example")
    cluster, _, deleter, _ = node(roots=(str(root),))
    lane = cluster._lane
    done = fired(cluster._purge_everything())
    assert len(lane.jobs) == 1 and done == [] and deleter.targets == []  # nothing listed on the reactor's thread
    lane.run()
    assert done == [None]
    assert deleter.targets == [PurgeTarget(str(root), ("a.example",)), PurgeTarget(str(root), ("b.example",))]


@pytest.mark.parametrize("line, origin_root, index", POISONED)
def test_a_poisoned_entry_cannot_leave_this_nodes_roots(line: bytes, origin_root: bytes, index: int) -> None:
    """Rebased, then checked by this node's own policy (a real Purger): refused, or a target inside its roots."""
    assert split_path(rebase(line, origin_root, index, POLICY_ROOTS)) is not None
    cluster, redis, deleter, _ = node()
    applied(cluster, "1-0", node=b"A", line=line, root=origin_root, root_index=str(index).encode())
    for target in deleter.targets:
        assert target.root in POLICY_ROOTS and not {"..", "."} & set(target.parts), target
        assert target.path.startswith(target.root + "/") and ".cachesvc-trash" not in target.parts
    assert redis.of("XADD")[0][-1] == ("1" if deleter.targets else "0")


@pytest.mark.parametrize(
    "values",
    [{"line": b"/b1/site/x\n/b1/other"}, {"line": b"/b1/site/x\r"}, {"line": b"/b1/" + b"x" * 200},
     {"line": b"/a1/site/x", "root": b"/a1", "root_index": b"-1"},
     {"line": b"/a1/site/x", "root": b"/a1", "root_index": b"1e3"},
     {"line": b"/a1/site/x", "root_index": b"0"}, {}],
)
def test_malformed_entries_are_acknowledged_as_failed_and_delete_nothing(values: dict[str, bytes]) -> None:
    cluster, redis, deleter, _ = node(max_line=100)
    assert applied(cluster, "2-0", node=b"A", **values) == 1
    assert deleter.targets == []
    assert redis.of("XADD")[0][-2:] == ("ok", "0")
    assert cluster._position == "2-0"  # never applied again


def test_a_line_refused_here_is_not_sent_and_a_path_is_sent_with_its_root() -> None:
    cluster, redis, _, _ = node(node="A", roots=("/a1", "/a2"))
    assert fired(cluster.purge(b"/etc/passwd")) == [False] and fired(cluster.purge(b"")) == [False]
    assert redis.calls == []
    assert fired(cluster.purge(b"/a2/site/x")) == [True]  # no live node: nobody to wait for
    assert fired(cluster.purge(b"https://site.example/")) == [False]  # no zones here: refused
    assert redis.of("XADD") == [("XADD", "s", "MINID", "~", f"{-86400 * 1000}-0", "*", "node", "A", "line",
                                  b"/a2/site/x", "root", "/a2", "root_index", 1)]


def test_the_reply_waits_for_every_live_node_and_names_those_that_did_not_answer(logged: list[str]) -> None:
    cluster, redis, _, clock = node(node="A", roots=("/a1",), wait=2.0)
    cluster.live = {"B", "C", "D"}
    result = fired(cluster.purge(b"/a1/site/x"))
    cluster._acks.record(ack("1000-0", "B"))
    cluster._acks.record(ack("1000-0", "C", ok=False))
    assert result == []
    clock.advance(2.0)
    assert result == [False]
    assert any("failed on C; no answer within 2s from D; answered Purge: Error (purged here)" in line
               for line in logged), logged


def test_the_reply_is_success_once_every_live_node_succeeded() -> None:
    cluster, _, _, clock = node(node="A", roots=("/a1",))
    cluster.live = {"B", "C"}
    cluster._acks.record(ack("1000-0", "C"))  # read before XADD's reply
    result = fired(cluster.purge(b"/a1/site/x"))
    cluster._acks.record(ack("1000-0", "B"))
    assert result == [True]
    assert clock.getDelayedCalls() == []


# --- purge.cluster -------------------------------------------------------------------------------


def check(**kw: Any) -> ClusterSettings:
    kw.setdefault("node", "web-1")
    return check_cluster(ClusterConfig(**kw), None)


@pytest.mark.parametrize(
    "redis, host, port, password, db",
    [("127.0.0.1:6379", "127.0.0.1", 6379, "", 0), ("redis.internal:6380", "redis.internal", 6380, "", 0),
     ("redis://10.0.0.5", "10.0.0.5", 6379, "", 0), ("redis://:s3cret@10.0.0.5:6380/3", "10.0.0.5", 6380, "s3cret", 3),
     ("redis://r.internal:6379/15", "r.internal", 6379, "", 15), ("redis://[::1]:6380/2", "::1", 6380, "", 2)],
)
def test_redis_addresses(redis: str, host: str, port: int, password: str, db: int) -> None:
    s = check(redis=redis)
    assert (s.host, s.port, s.password, s.db) == (host, port, password, db)


def test_a_url_password_is_percent_decoded() -> None:
    """A password with ``@`` or ``:`` must be percent-encoded in a URL (as redis-py and redis-cli read it)."""
    assert check(redis="redis://:p%40ss%3Aw%2Frd@10.0.0.5:6379/0").password == "p@ss:w/rd"


def test_a_bracketed_ipv6_address_is_one_redis_can_be_reached_at() -> None:
    s = check(redis="[::1]:6379")
    assert (s.host, s.port) == ("::1", 6379)


@pytest.mark.parametrize(
    "redis",
    ["localhost", ":6379", "host:", "host:0", "host:65536", "host:abc", "host:-1", "redis://", "redis://:6379",
     "http://host:6379", "rediss://host:6379", "redis://host:99999", "redis://host:6379/abc", "redis://host/1/2",
     "redis://host/0?timeout=1", "redis://ho\nst:6379", "", "redis://host:0/0"],
)
def test_bad_redis_addresses_are_refused_with_an_example(redis: str) -> None:
    with pytest.raises(ConfigError, match=r"purge\.cluster\.redis: .* is not a Redis address; use 127\.0\.0\.1:6379"):
        check(redis=redis)


@pytest.mark.parametrize("redis", ["redis://host/-1", "redis://host/99999999999999999999"])
def test_a_database_number_out_of_range_is_refused(redis: str) -> None:
    """As ``redis.db`` is for the recache half (``must be >= 0``); SELECT would refuse it only at run time."""
    with pytest.raises(ConfigError, match=r"purge\.cluster\.redis"):
        check(redis=redis)


def test_a_url_username_is_not_silently_dropped() -> None:
    """``redis://user:pw@host`` would AUTH as the default user with user's password: refuse it (or use it)."""
    with pytest.raises(ConfigError, match=r"purge\.cluster\.redis"):
        check(redis="redis://user:pw@host:6379/0")


@pytest.mark.parametrize("name", ["web-1", "w", "a" * 64, "web_1.eu-west", "10.0.0.5", "Web1"])
def test_node_names(name: str) -> None:
    assert check(node=name).node == name


@pytest.mark.parametrize("name", ["web 1", "-web", ".web", "a" * 65, "web/1", "wéb", "web:1", "web\n1", "_x"])
def test_bad_node_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=r"purge\.cluster\.node: .* is not a node name; use letters, digits"):
        check(node=name)


def test_the_node_defaults_to_the_host_name_and_bad_streams_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "web-7.example")
    assert check_cluster(ClusterConfig(), None).node == "web-7.example"
    for stream in ("", "a b", "x\ty", "s\n"):
        with pytest.raises(ConfigError, match=r"purge\.cluster\.stream"):
            check(stream=stream)


@pytest.mark.parametrize(
    "field, value, message",
    [("wait", 0.0, "must be more than 0s"), ("wait", -1.0, "must be more than 0s"),
     ("heartbeat", 0.0, "must be more than 0s"), ("retention", 0.0, "must be more than 0s"),
     ("retention", 59.0, "shorter than a restart; use at least 1m")],
)
def test_bad_durations_are_refused(field: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"purge\.cluster\.{field}: .*{message}|purge\.cluster\.{field}: {message}"):
        check(**{field: value})


def yaml_file(tmp_path: Path, cluster: str) -> str:
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cachesvc.yaml").write_text(f"purge:\n  roots: [{tmp_path / 'cache'}]\n  cluster:\n{cluster}")
    return str(tmp_path / "cachesvc.yaml")


def test_the_config_file(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "    redis: redis://:pw@10.0.0.5:6380/1\n    node: web-2\n    wait: 500ms\n"
                               "    retention: 1m\n    heartbeat: 200ms\n    stream: site:purge\n")
    s = config.resolve(path).purge
    assert s is not None and s.cluster == ClusterSettings(
        host="10.0.0.5", port=6380, password="pw", db=1, node="web-2", stream="site:purge", wait=0.5,
        retention=60.0, heartbeat=0.2)
    (tmp_path / "plain.yaml").write_text(f"purge:\n  roots: [{tmp_path / 'cache'}]\n")
    plain = config.resolve(str(tmp_path / "plain.yaml")).purge
    assert plain is not None and plain.cluster is None  # without cluster, nothing changes
    s = check()
    assert (s.address, s.password, s.db, s.stream, s.wait, s.retention, s.heartbeat) == (
        "127.0.0.1:6379", "", 0, "cachesvc:purge", 2.0, 86400.0, 1.0)


@pytest.mark.parametrize(
    "text, message",
    [("    wait: 2\n", "purge.cluster.wait"), ("    heartbeat: soon\n", "purge.cluster.heartbeat"),
     ("    retention: 30s\n", "purge.cluster.retention"), ("    nodes: web-1\n", "purge.cluster.nodes"),
     ("    redis: 6379\n", "purge.cluster.redis")],
)
def test_config_file_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config.resolve(yaml_file(tmp_path, text))
