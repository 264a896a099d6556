"""The purge path policy: which request bytes may name something to delete."""

from __future__ import annotations

import pytest

from cachesvc.purge.paths import PathPolicy, PurgeTarget, Refused

POLICY = PathPolicy(["/cache", "/var/cache/nginx"])


@pytest.mark.parametrize(
    "raw, root, parts",
    [
        (b"/cache/example.com", "/cache", ("example.com",)),
        (b"/cache/example.com/", "/cache", ("example.com",)),
        (
            b"/cache/example.com/5/cd/ee80e68666834decf6fe00921710ccd5",
            "/cache",
            ("example.com", "5", "cd", "ee80e68666834decf6fe00921710ccd5"),
        ),
        (b"/cache//example.com//x", "/cache", ("example.com", "x")),
        (b"/var/cache/nginx/site", "/var/cache/nginx", ("site",)),
        ("/cache/caf\u00e9.example".encode(), "/cache", ("caf\u00e9.example",)),
        (b"/cache/...", "/cache", ("...",)),
    ],
)
def test_accepted_paths(raw: bytes, root: str, parts: tuple[str, ...]) -> None:
    assert POLICY.target(raw) == PurgeTarget(root, parts)


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"", "empty"),
        (b"cache/example.com", "absolute"),
        (b"example.com", "absolute"),
        (b"/cache/exa\0mple.com", "NUL"),
        (b"/cache/\xff\xfe", "UTF-8"),
        (b"/cache/../etc/passwd", "'..'"),
        (b"/cache/example.com/..", "'..'"),
        (b"/cache/./example.com", "'.'"),
        (b"/cache", "cache root itself"),
        (b"/cache/", "cache root itself"),
        (b"//cache//", "cache root itself"),
        (b"/cache-evil/x", "outside"),
        (b"/cachex", "outside"),
        (b"/etc/passwd", "outside"),
        (b"/", "outside"),
        (b"/var/cache/other", "outside"),
    ],
)
def test_refused_paths(raw: bytes, reason: str) -> None:
    with pytest.raises(Refused) as e:
        POLICY.target(raw)
    assert reason in str(e.value)


def test_nested_root_wins_for_its_paths() -> None:
    policy = PathPolicy(["/srv", "/srv/cache"])
    assert policy.target(b"/srv/cache/site") == PurgeTarget("/srv/cache", ("site",))
    with pytest.raises(Refused):
        policy.target(b"/srv/cache")


def test_zone_root_and_containment() -> None:
    zone = POLICY.target(b"/cache/example.com")
    inner = POLICY.target(b"/cache/example.com/a/bc")
    assert zone.is_zone_root and not inner.is_zone_root
    assert zone.contains(inner) and not inner.contains(zone)
    assert not zone.contains(POLICY.target(b"/cache/example.community"))
    assert inner.path == "/cache/example.com/a/bc"


def test_the_trash_and_everything_in_it_are_refused_and_nothing_beside_it() -> None:
    policy = PathPolicy(["/cache", "/cache/deep"], trash="/cache/.cachesvc-trash")
    for raw in (b"/cache/.cachesvc-trash", b"/cache/.cachesvc-trash/slot/x", b"/cache//.cachesvc-trash/x/"):
        with pytest.raises(Refused, match="trash"):
            policy.target(raw)
    assert policy.target(b"/cache/.cachesvc-trash-not/x").parts == (".cachesvc-trash-not", "x")
    assert policy.target(b"/cache/deep/.cachesvc-trash/x").root == "/cache/deep"  # another root's path
    assert PathPolicy(["/cache"], trash="/elsewhere/trash").target(b"/cache/elsewhere/trash").root == "/cache"
