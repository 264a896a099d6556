"""Deleting on a real filesystem: zone roots kept, symlinks never followed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from cachesvc.purge.deleter import Deleted, delete_now
from cachesvc.purge.paths import PathPolicy, Refused


def make_zone(root: Path, name: str = "example.com", files: int = 20) -> Path:
    zone = root / name
    for i in range(files):
        leaf = zone / f"{i % 10}" / f"{i % 7:02d}"
        leaf.mkdir(parents=True, exist_ok=True)
        (leaf / f"hash{i}").write_bytes(b"KEY: x\n")
    return zone


def target(root: Path, rel: str):
    return PathPolicy([str(root)]).target(f"{root}/{rel}".encode())


def test_zone_root_is_emptied_and_kept_with_owner_and_mode(cache_root: Path) -> None:
    zone = make_zone(cache_root)
    os.chmod(zone, 0o710)
    before = zone.stat()
    assert delete_now(target(cache_root, "example.com")) == Deleted("deleted", 20)
    after = zone.stat()
    assert list(zone.iterdir()) == []
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_ino) == (
        before.st_mode, before.st_uid, before.st_gid, before.st_ino
    )


def test_deeper_directory_is_removed(cache_root: Path) -> None:
    zone = make_zone(cache_root)
    assert delete_now(target(cache_root, "example.com/1")).outcome == "deleted"
    assert not (zone / "1").exists() and (zone / "2").exists()


def test_single_file_and_missing_paths(cache_root: Path) -> None:
    zone = make_zone(cache_root)
    assert delete_now(target(cache_root, "example.com/3/03/hash3")) == Deleted("deleted", 1)
    assert not (zone / "3/03/hash3").exists()
    assert delete_now(target(cache_root, "example.com/3/03/hash3")) == Deleted("absent", 0)
    assert delete_now(target(cache_root, "nosuchsite/a/b")) == Deleted("absent", 0)
    assert delete_now(target(cache_root, "example.com/3/03/hash13/below")) == Deleted("absent", 0)


def test_symlink_on_the_way_is_refused_and_outside_survives(tmp_path: Path, cache_root: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "inner").mkdir(parents=True)
    (outside / "inner" / "precious").write_text("keep")
    (cache_root / "evil").symlink_to(outside)
    (cache_root / "site").mkdir()
    (cache_root / "site" / "link").symlink_to(outside)
    for rel in ["evil/inner", "evil/inner/precious", "site/link/inner", "site/link/inner/precious"]:
        with pytest.raises(Refused, match="symlink"):
            delete_now(target(cache_root, rel))
    assert (outside / "inner" / "precious").read_text() == "keep"


def test_symlink_target_is_unlinked_not_followed(tmp_path: Path, cache_root: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    (cache_root / "site").mkdir()
    (cache_root / "site" / "dirlink").symlink_to(outside)
    (cache_root / "site" / "filelink").symlink_to(outside / "precious")
    (cache_root / "zonelink").symlink_to(outside)
    assert delete_now(target(cache_root, "site/dirlink")) == Deleted("deleted", 1)
    assert delete_now(target(cache_root, "site/filelink")) == Deleted("deleted", 1)
    assert delete_now(target(cache_root, "zonelink")) == Deleted("deleted", 1)
    assert not os.path.lexists(cache_root / "site" / "dirlink")
    assert not os.path.lexists(cache_root / "zonelink")
    assert (outside / "precious").read_text() == "keep"


def test_symlinks_inside_a_deleted_tree_are_removed_as_links(tmp_path: Path, cache_root: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    zone = make_zone(cache_root, files=5)
    (zone / "1" / "link").symlink_to(outside)
    (zone / "toplink").symlink_to(outside / "precious")
    assert delete_now(target(cache_root, "example.com")) == Deleted("deleted", 7)
    assert list(zone.iterdir()) == []
    assert (outside / "precious").read_text() == "keep"


def test_permission_error_is_raised_not_hidden(cache_root: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    zone = make_zone(cache_root, files=1)
    os.chmod(zone / "0", 0o500)
    try:
        with pytest.raises(PermissionError):
            delete_now(target(cache_root, "example.com"))
    finally:
        os.chmod(zone / "0", 0o700)


class HeldLane:
    """A lane whose jobs run only when the test releases them."""

    def __init__(self) -> None:
        self.jobs: list = []
        self.reactor = Clock()

    def submit(self, job):
        d = Deferred()
        self.jobs.append((job, d))
        return d

    def release(self) -> None:
        job, d = self.jobs.pop(0)
        try:
            result = job()
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(result)


def test_batching_deleter_sends_one_batch_while_busy_and_maps_results() -> None:
    from cachesvc.purge.deleter import BatchingDeleter

    current: list[str] = []

    def fake_delete(t, harvest=None, roots=None):
        current.append(t.parts[-1])
        if t.parts[-1] == "bad":
            raise PermissionError(13, "Permission denied")
        return Deleted("deleted", 1)

    lane = HeldLane()
    deleter = BatchingDeleter(lane, fake_delete)  # type: ignore[arg-type]
    policy = PathPolicy(["/cache"])
    results: dict[str, object] = {}

    def ask(name: str) -> None:
        d = deleter.delete(policy.target(f"/cache/s/{name}".encode()))
        d.addCallbacks(lambda r: results.__setitem__(name, r), lambda f: results.__setitem__(name, f.value))

    ask("a")  # idle: it goes at once
    assert len(lane.jobs) == 1
    ask("b"), ask("bad"), ask("c")  # busy: they wait
    lane.reactor.advance(0)
    assert len(lane.jobs) == 1
    lane.release()
    assert results == {"a": Deleted("deleted", 1)}
    assert lane.jobs == []  # the three waiting ones go at the end of this turn, together
    lane.reactor.advance(0)
    assert len(lane.jobs) == 1
    current.clear()
    lane.release()
    assert current == ["b", "bad", "c"]
    assert results["b"] == Deleted("deleted", 1) and results["c"] == Deleted("deleted", 1)
    assert isinstance(results["bad"], PermissionError)
    lane.reactor.advance(0)
    assert lane.jobs == []
    ask("d")  # idle again: at once
    assert len(lane.jobs) == 1
