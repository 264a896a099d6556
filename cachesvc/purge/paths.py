"""Which request bytes name a purgeable path: the purge service's safety policy, with no I/O.

The daemon runs as root or as the cache owner, so this is decided on the bytes alone, before any
filesystem call: only paths strictly below a configured root, no ``.``/``..`` segments, no NUL.
Symlinks are the deleter's job (they can only be seen on disk, and it walks without following them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class Refused(Exception):
    """The request names nothing this daemon may delete; ``str(self)`` is the reason for the log."""


@dataclass(frozen=True)
class PurgeTarget:
    """A path below *root*: ``root/parts[0]/.../parts[-1]``, with at least one part."""

    root: str
    parts: tuple[str, ...]

    @property
    def path(self) -> str:
        return self.root + "/" + "/".join(self.parts)

    @property
    def is_zone_root(self) -> bool:
        """A direct child of a cache root: an nginx ``fastcgi_cache_path``, emptied but kept."""
        return len(self.parts) == 1

    def contains(self, other: PurgeTarget) -> bool:
        """True if *other* is this path or below it."""
        return self.root == other.root and other.parts[: len(self.parts)] == self.parts


class PathPolicy:
    """Maps a request line to a :class:`PurgeTarget` below one of *roots*, or raises :class:`Refused`."""

    def __init__(self, roots: Sequence[str], trash: str | None = None) -> None:
        # Longest root first, so a root nested in another one wins for paths below it.
        self._roots = sorted(
            ((root, tuple(p for p in root.split("/") if p)) for root in roots),
            key=lambda r: len(r[1]),
            reverse=True,
        )
        trash_parts = tuple(p for p in trash.split("/") if p) if trash else None
        # Per root, the trash's parts below it (None: the trash is not below that root).
        self._trash_below = {
            root: trash_parts[len(root_parts) :]
            if trash_parts is not None and trash_parts[: len(root_parts)] == root_parts else None
            for root, root_parts in self._roots
        }

    @property
    def roots(self) -> list[str]:
        return [root for root, _ in self._roots]

    def target(self, raw: bytes) -> PurgeTarget:
        if not raw:
            raise Refused("empty request")
        if b"\0" in raw:
            raise Refused("NUL byte in path")
        try:
            path = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("path is not valid UTF-8") from None
        if not path.startswith("/"):
            raise Refused("not an absolute path")
        segments = path.split("/")
        if "." in segments or ".." in segments:
            raise Refused("'.' or '..' segment in path")
        parts = tuple(filter(None, segments))
        for root, root_parts in self._roots:
            if parts[: len(root_parts)] == root_parts:
                if len(parts) == len(root_parts):
                    raise Refused(f"{root} is a cache root itself; purge a site below it")
                below = parts[len(root_parts) :]
                trash = self._trash_below[root]
                if trash is not None and below[: len(trash)] == trash:
                    raise Refused("that is the purge daemon's trash")
                return PurgeTarget(root, below)
        raise Refused(f"outside every cache root ({', '.join(self.roots)})")
