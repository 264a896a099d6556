"""The purger: coalescing of concurrent purges, and what it answers for each kind of request."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from cachesvc.purge.config import ZoneConfig, check_zone
from cachesvc.purge.deleter import Deleted
from cachesvc.purge.paths import PathPolicy, PurgeTarget
from cachesvc.purge.purger import Purger
from cachesvc.purge.zones import ZoneMap


class ManualDeleter:
    def __init__(self) -> None:
        self.calls: list[PurgeTarget] = []
        self.pending: list[Deferred[Deleted]] = []

    def delete(self, target: PurgeTarget, harvest: object = None) -> Deferred[Deleted]:
        self.calls.append(target)
        d: Deferred[Deleted] = Deferred()
        self.pending.append(d)
        return d


def make(zones: list[ZoneConfig] | None = None) -> tuple[Purger, ManualDeleter]:
    policy = PathPolicy(["/cache"])
    deleter = ManualDeleter()
    return Purger(policy, deleter, Clock(), ZoneMap([check_zone(z, ["/cache"]) for z in zones or []], policy)), deleter


def results(ds: list[Deferred]) -> list:
    out: list = []
    for d in ds:
        d.addBoth(out.append)
    return out


def test_identical_purges_share_one_operation() -> None:
    purger, deleter = make()
    answers = results([purger.purge(b"/cache/example.com") for _ in range(5)])
    assert len(deleter.calls) == 1
    deleter.pending[0].callback(Deleted("deleted", None))
    assert answers == [True] * 5
    purger.purge(b"/cache/example.com")  # after it finished: a new operation
    assert len(deleter.calls) == 2


def test_purge_below_a_running_purge_waits_for_it() -> None:
    purger, deleter = make()
    outer = results([purger.purge(b"/cache/example.com")])
    inner = results([purger.purge(b"/cache/example.com/5/cd/ee80e68666834decf6fe00921710ccd5")])
    other = results([purger.purge(b"/cache/example.community/x")])
    assert [t.path for t in deleter.calls] == ["/cache/example.com", "/cache/example.community/x"]
    deleter.pending[0].callback(Deleted("deleted", 10))
    assert outer == [True] and inner == []
    assert deleter.calls[-1].path == "/cache/example.com/5/cd/ee80e68666834decf6fe00921710ccd5"
    deleter.pending[2].callback(Deleted("absent", 0))
    assert inner == [True]
    assert other == []  # an unrelated path ran at once and is answered when its own deletion ends
    deleter.pending[1].callback(Deleted("absent", 0))
    assert other == [True]


def test_failure_is_shared_and_answers_false() -> None:
    purger, deleter = make()
    answers = results([purger.purge(b"/cache/a"), purger.purge(b"/cache/a")])
    deleter.pending[0].errback(PermissionError(13, "Permission denied", "/cache/a"))
    assert answers == [False, False]


def test_url_purge_deletes_every_candidate_and_needs_zones() -> None:
    purger, deleter = make([ZoneConfig(hosts=["example.com"], path="/cache/{host}")])
    answer = results([purger.purge(b"https://example.com/hello-world")])
    assert len(deleter.calls) == 4  # GET, HEAD x as given, twin
    assert "/cache/example.com/5/cd/ee80e68666834decf6fe00921710ccd5" in [t.path for t in deleter.calls]
    for d in deleter.pending:
        d.callback(Deleted("absent", 0))
    assert answer == [True]
    unmatched = results([purger.purge(b"https://other.example/")])
    assert unmatched == [False]
    nozones, _ = make()
    assert results([nozones.purge(b"https://example.com/")]) == [False]
