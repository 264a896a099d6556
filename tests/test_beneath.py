"""openat2 descents: refused where the component-by-component walk refuses, and the same outcomes without it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cachesvc.purge import beneath
from cachesvc.purge.beneath import open_beneath
from cachesvc.purge.fstree import DIR_FLAGS, RootDirs, open_parent
from cachesvc.purge.paths import PathPolicy, Refused

pytestmark = pytest.mark.skipif(beneath._missing, reason="this system has no openat2")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    (root / "site" / "a" / "bc").mkdir(parents=True)
    (root / "site" / "a" / "bc" / "file").write_text("x")
    (tmp_path / "outside" / "inner").mkdir(parents=True)
    (root / "site" / "evil").symlink_to(tmp_path / "outside")
    (root / "site" / "rel").symlink_to("a")
    (root / "site" / "plain").write_text("y")
    return root


def test_a_descent_opens_the_directory_itself(tree: Path) -> None:
    root = os.open(tree, DIR_FLAGS)
    try:
        fd = open_beneath(root, "site/a/bc", DIR_FLAGS & ~os.O_NOFOLLOW)
        assert fd is not None
        try:
            assert os.fstat(fd).st_ino == (tree / "site" / "a" / "bc").stat().st_ino
        finally:
            os.close(fd)
    finally:
        os.close(root)


@pytest.mark.parametrize(("path", "code"), [
    ("site/evil/inner", errno.ELOOP),  # a symlink on the way, to outside
    ("site/evil", errno.ELOOP),  # a symlink as the last component
    ("site/rel", errno.ELOOP),  # a relative symlink inside the tree is refused all the same
    ("site/../../outside", errno.EXDEV),  # an escape
    ("site/a/missing", errno.ENOENT),
    ("site/plain/x", errno.ENOTDIR),
])
def test_what_the_walk_refuses_openat2_refuses(tree: Path, path: str, code: int) -> None:
    root = os.open(tree, DIR_FLAGS)
    try:
        with pytest.raises(OSError) as caught:
            open_beneath(root, path, DIR_FLAGS & ~os.O_NOFOLLOW)
        assert caught.value.errno == code
    finally:
        os.close(root)


CASES = ["site/a/bc/file", "site/a/bc/missing", "site/a/nothere/file", "site/plain/x", "site/evil/inner/x",
         "site/evil/x", "site/rel/bc/file", "site/x"]


def _outcome(policy: PathPolicy, tree: Path, rel: str, roots: RootDirs | None = None) -> object:
    try:
        fd = open_parent(policy.target(f"{tree}/{rel}".encode()), roots)
    except Refused as e:
        return ("refused", str(e))
    if fd is None:
        return None
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def test_open_parent_gives_the_same_outcomes_with_and_without_openat2(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = PathPolicy([str(tree)])
    fast = [_outcome(policy, tree, rel) for rel in CASES]
    roots = RootDirs()  # a batch's roots, opened once
    open_before = len(os.listdir("/proc/self/fd"))
    assert [_outcome(policy, tree, rel, roots) for rel in CASES] == fast
    assert len(os.listdir("/proc/self/fd")) == open_before + 1  # the root, held for the batch
    roots.close()
    assert len(os.listdir("/proc/self/fd")) == open_before
    monkeypatch.setattr(beneath, "_missing", True)
    assert [_outcome(policy, tree, rel) for rel in CASES] == fast
    walking = RootDirs()
    assert [_outcome(policy, tree, rel, walking) for rel in CASES] == fast
    walking.close()
    assert fast[0] == (tree / "site" / "a" / "bc").stat().st_ino and fast[1] == fast[0]
    assert fast[2] is None and fast[3] is None
    assert fast[4] == ("refused", f"symlink at {tree}/site/evil") and fast[5] == fast[4]
    assert fast[6] == ("refused", f"symlink at {tree}/site/rel")
