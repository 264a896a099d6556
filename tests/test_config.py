"""Config loading: defaults, durations, and refusals that name the key, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachesvc import config
from cachesvc.durations import parse_duration
from cachesvc.purge.config import PurgeConfig, PurgeSettings
from cachesvc.purge.zones import Zone


@pytest.mark.parametrize(
    "text, seconds",
    [("30s", 30), ("1m30s", 90), ("250ms", 0.25), ("1.5h", 5400), ("2d", 172800), ("1w", 604800),
     ("1.5d", 129600), ("0", 0), ("100us", 1e-4), ("-1s", -1), ("1h2m3s4ms", 3723.004), (".5s", 0.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "s", "1x", "1m30", "abc", "1 s", "--1s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cachesvc.yaml"
    path.write_text(text)
    return str(path)


def test_no_file_means_defaults() -> None:
    c = config.load(None)
    assert c.purge == PurgeConfig()
    assert c.purge.listen == "tcp:7836:interface=127.0.0.1"
    assert c.purge.roots == ["/cache"]
    assert c.purge.idle_timeout == 30 and c.purge.max_line_length == 4096


def test_full_purge_section(tmp_path: Path, cache_root: Path) -> None:
    path = write(
        tmp_path,
        f"purge:\n  listen: tcp:9999\n  roots: [{cache_root}/]\n  idle_timeout: 1m30s\n  max_line_length: 512\n",
    )
    c = config.resolve(path)
    trash = f"{cache_root}/.cachesvc-trash"  # the default: a hidden child of the first root
    assert c.purge == PurgeSettings("tcp:9999", (str(cache_root),), 90.0, 512, trash, ())


def test_command_line_overrides_file(tmp_path: Path, cache_root: Path) -> None:
    path = write(tmp_path, "purge:\n  roots: [/does/not/exist]\n")
    c = config.resolve(path, listen="tcp:1234", roots=[str(cache_root)])
    assert c.purge is not None
    assert c.purge.roots == (str(cache_root),) and c.purge.listen == "tcp:1234"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("purge:\n  rootz: [/cache]\n", ["purge.rootz", "unknown configuration field", "roots"]),
        ("bogus: 1\n", ["bogus", "unknown configuration field"]),
        ("purge:\n  roots: /cache\n", ["purge.roots", "expected a list"]),
        ("purge:\n  max_line_length: lots\n", ["purge.max_line_length", "whole number", "'lots'"]),
        ("purge:\n  idle_timeout: 30\n", ["purge.idle_timeout", "unit"]),
        ("purge:\n  idle_timeout: 30 seconds\n", ["purge.idle_timeout", "'30 seconds'", "e.g. 30s"]),
        ("purge:\n  roots: [cache]\n", ["purge.roots[0]", "relative", "absolute"]),
        ("purge:\n  roots: [/]\n", ["purge.roots[0]", "whole filesystem"]),
        ("purge:\n  roots: [/no/such/dir]\n", ["purge.roots[0]", "/no/such/dir", "does not exist", "create it"]),
        ("purge:\n  roots: []\n", ["purge.roots", "at least one"]),
        ("purge:\n  listen: 'bogus:1'\n", ["purge.listen", "bogus:1", "tcp:7836"]),
        ("purge:\n  idle_timeout: 0s\n", ["purge.idle_timeout", "> 0"]),
        ("purge: [1]\n", ["purge", "mapping"]),
        ("purge:\n  roots: [/cache\n", ["not valid YAML"]),
        ("{}\n", ["nothing to run", "purge:"]),
    ],
)
def test_refusals_name_key_value_and_fix(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as e:
        config.resolve(path)
    message = str(e.value)
    assert message.startswith(path)
    for fragment in expected:
        assert fragment in message


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(config.ConfigError, match="is not a directory"):
        config.resolve(None, roots=[str(tmp_path / "file")])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read config file"):
        config.resolve(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    "section, expected",
    [
        ("  trash_dir: {root}/example.com/.trash\n", ["purge.trash_dir", "inside a cache zone", "cache loader"]),
        ("  trash_dir: {root}\n", ["purge.trash_dir", "would contain the cache root"]),
        ("  trash_dir: relative/trash\n", ["purge.trash_dir", "relative"]),
        ("  trash_dir: /no/such/parent/trash\n", ["purge.trash_dir", "parent", "does not exist"]),
        ("  zones:\n    - hosts: [a.example]\n", ["purge.zones[0].path", "required field is missing"]),
        ("  zones:\n    - path: /x\n      hosts: [a]\n      levels: '1:3'\n", ["purge.zones[0]", "levels", "1:2"]),
        ("  zones:\n    - hosts: [a]\n      path: /elsewhere/{{host}}\n", ["purge.zones[0]", "not below a cache root"]),
        (
            "  zones:\n    - hosts: [a]\n      path: {root}/{{host}}\n      colour: red\n",
            ["purge.zones[0].colour", "unknown configuration field"],
        ),
    ],
)
def test_trash_and_zone_refusals(tmp_path: Path, cache_root: Path, section: str, expected: list[str]) -> None:
    path = write(tmp_path, f"purge:\n  roots: [{cache_root}]\n" + section.format(root=cache_root))
    with pytest.raises(config.ConfigError) as e:
        config.resolve(path)
    for fragment in expected:
        assert fragment in str(e.value)


def test_trash_outside_the_roots_and_zones_are_accepted(tmp_path: Path, cache_root: Path) -> None:
    path = write(
        tmp_path,
        f"purge:\n  roots: [{cache_root}]\n  trash_dir: {tmp_path}/trash\n"
        f"  zones:\n    - hosts: ['*']\n      path: {cache_root}/{{host}}\n      levels: '2'\n      methods: [GET]\n",
    )
    c = config.resolve(path)
    assert c.purge is not None and c.purge.trash_dir == f"{tmp_path}/trash"
    assert c.purge.zones == (
        Zone(frozenset(["*"]), f"{cache_root}/{{host}}", (2,), "$scheme$request_method$host$request_uri", ("GET",)),
    )
