"""Reading keys from nginx cache files and prefix scans on a real directory tree."""

from __future__ import annotations

import os
from pathlib import Path

from cachesvc.purge.nginxcache import ScanResult, purge_prefixes, read_key
from cachesvc.purge.paths import PathPolicy
from harness.nginxfiles import write_entry


def test_read_key(tmp_path: Path) -> None:
    path = write_entry(tmp_path, "httpsGETexample.com/a")
    long_key = "httpsGETexample.com/" + "x" * 3000
    long_path = write_entry(tmp_path, long_key)
    (tmp_path / "junk").write_bytes(b"not a cache file")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert read_key(fd, os.path.relpath(path, tmp_path)) == b"httpsGETexample.com/a"
        assert read_key(fd, os.path.relpath(long_path, tmp_path)) == long_key.encode()
        assert read_key(fd, "junk") is None
        assert read_key(fd, "missing") is None
    finally:
        os.close(fd)


def test_prefix_purge_deletes_only_matching_keys(tmp_path: Path, cache_root: Path) -> None:
    zone = cache_root / "example.com"
    blog = [write_entry(zone, f"httpsGETexample.com/blog/{i}") for i in range(30)]
    blog_head = write_entry(zone, "httpsHEADexample.com/blog/x")
    keep = [write_entry(zone, f"httpsGETexample.com/shop/{i}") for i in range(30)]
    keep.append(write_entry(zone, "httpsGETexample.com/blog"))  # no trailing slash: not below /blog/
    keep.append(write_entry(zone, "httpGETexample.com/blog/1"))  # other scheme
    outside = tmp_path / "outside"
    write_entry(outside, "httpsGETexample.com/blog/outside")
    (zone / "link").symlink_to(outside)
    target = PathPolicy([str(cache_root)]).target(str(zone).encode())
    seen: list[ScanResult] = []
    result = purge_prefixes(target, [b"httpsGETexample.com/blog/", b"httpsHEADexample.com/blog/"], seen.append, every=0)
    assert (result.scanned, result.deleted) == (63, 31)
    assert not any(p.exists() for p in blog + [blog_head])
    assert all(p.exists() for p in keep)
    assert len(list(outside.rglob("*.*"))) == 0 and len([p for p in outside.rglob("*") if p.is_file()]) == 1
    assert seen and seen[-1].scanned <= 63


def test_prefix_purge_of_missing_zone(cache_root: Path) -> None:
    target = PathPolicy([str(cache_root)]).target(f"{cache_root}/none.example".encode())
    assert purge_prefixes(target, [b"x"]) == ScanResult(0, 0, 0.0)
