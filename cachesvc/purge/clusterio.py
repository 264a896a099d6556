"""The cluster channel's Redis side: key names, stream ids and replies, and the acknowledgements awaited."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall

from cachesvc.recache.redisclient import RedisClient, RedisError

KEPT_ACKS = 10_000
"""Acknowledgements kept for entries nobody waits on yet (one may arrive before its XADD's reply)."""


@dataclass(frozen=True)
class Keys:
    """Every Redis key of the cluster channel, named after the stream."""

    stream: str
    node: str

    @property
    def acks(self) -> str:
        return f"{self.stream}:acks"

    @property
    def members(self) -> str:
        return f"{self.stream}:members"

    @property
    def heartbeat(self) -> str:
        return self.heartbeat_of(self.node)

    def heartbeat_of(self, node: str) -> str:
        return f"{self.stream}:node:{node}"

    @property
    def position(self) -> str:
        return f"{self.stream}:pos:{self.node}"


def text(value: Any) -> str:
    """A reply's bytes as text (``""`` for nil)."""
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def fields(flat: Sequence[Any]) -> dict[bytes, bytes]:
    """A stream entry's ``[field, value, ...]`` as a mapping."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _parts(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    try:
        return int(ms or 0), int(seq or 0)
    except ValueError:
        return 0, 0


def newer(a: str, b: str) -> bool:
    """Whether stream id *a* comes after *b*."""
    return _parts(a) > _parts(b)


@dataclass(frozen=True)
class StreamInfo:
    last: str  # the last id ever generated ("0-0": none)
    trimmed: str  # the highest id deleted by XDEL ("0-0": none); trimming is not recorded here
    first: str = ""  # the first entry's id ("": the stream is empty)
    added: int = 0  # entries ever added
    length: int = 0  # entries it holds


@inlineCallbacks
def stream_info(redis: RedisClient, stream: str) -> Generator[Deferred[Any], Any, StreamInfo]:
    """What ``XINFO STREAM`` says of *stream* (a stream that does not exist: nothing generated, nothing deleted)."""
    try:
        reply = yield redis.call("XINFO", "STREAM", stream)
    except RedisError as e:
        if "no such key" in str(e).lower():
            return StreamInfo("0-0", "0-0")
        raise
    info = {text(reply[i]): reply[i + 1] for i in range(0, len(reply) - 1, 2)}
    first = info.get("first-entry")
    return StreamInfo(
        text(info.get("last-generated-id")) or "0-0",
        text(info.get("max-deleted-entry-id")) or "0-0",
        text(first[0]) if first else "",
        int(text(info.get("entries-added")) or 0),
        int(text(info.get("length")) or 0),
    )


def zone_roots(roots: Sequence[str]) -> list[str]:
    """Blocking: every zone a root holds (its plain subdirectories; the trash and dot-directories excluded)."""
    found = []
    for root in roots:
        try:
            names = sorted(os.listdir(root))
        except OSError:
            continue
        for name in names:
            path = os.path.join(root, name)
            if not name.startswith(".") and os.path.isdir(path) and not os.path.islink(path):
                found.append(path)
    return found


@dataclass
class _Waiter:
    expected: set[str]
    d: Deferred[dict[str, bool]]
    answers: dict[str, bool] = field(default_factory=dict)
    call: IDelayedCall | None = None


class Acks:
    """The acknowledgements of the entries this node published, matched to the purges that wait for them."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._waiting: dict[str, _Waiter] = {}
        self._early: OrderedDict[str, dict[str, bool]] = OrderedDict()

    def record(self, values: dict[bytes, bytes]) -> None:
        entry, node = text(values.get(b"id")), text(values.get(b"node"))
        ok = values.get(b"ok") == b"1"
        waiter = self._waiting.get(entry)
        if waiter is None:
            self._early.setdefault(entry, {})[node] = ok
            while len(self._early) > KEPT_ACKS:
                self._early.popitem(last=False)
            return
        waiter.answers[node] = ok
        if waiter.expected <= set(waiter.answers):
            self._settle(entry)

    def expect(self, entry: Any, expected: set[str], wait: float) -> Deferred[dict[str, bool]]:
        """Fire with the answers of *expected* for *entry* once all came, or after *wait* with those that did."""
        key = text(entry)
        waiter = _Waiter(set(expected), Deferred())
        waiter.answers.update(self._early.pop(key, {}))
        self._waiting[key] = waiter
        if waiter.expected <= set(waiter.answers):
            self._settle(key)
        else:
            waiter.call = self._reactor.callLater(wait, self._settle, key)
        return waiter.d

    def abandon(self) -> None:
        for key in list(self._waiting):
            self._settle(key)

    def _settle(self, key: str) -> None:
        waiter = self._waiting.pop(key, None)
        if waiter is None:
            return
        if waiter.call is not None and waiter.call.active():
            waiter.call.cancel()
        waiter.d.callback({n: ok for n, ok in waiter.answers.items() if n in waiter.expected})


_MODES = (b"soft:", b"hard:")
_TAG = b"tag:"


def split_path(line: bytes) -> tuple[bytes, bytes, bytes] | None:
    """A purge line's (prefix, path, rest) when it names a path (a path or a tag purge's scope); else ``None``."""
    head = b""
    for mode in _MODES:
        if line.startswith(mode):
            head, line = mode, line[len(mode) :]
            break
    if line.startswith(_TAG):
        scope, space, rest = line[len(_TAG) :].partition(b" ")
        return (head + _TAG, scope, space + rest) if scope.startswith(b"/") else None
    return (head, line, b"") if line.startswith(b"/") else None


def root_of(path: bytes, roots: Sequence[str]) -> int | None:
    """The index of the (longest) root *path* lies below, or ``None``."""
    best: tuple[int, int] | None = None
    for i, root in enumerate(roots):
        prefix = root.encode() + b"/"
        if path.startswith(prefix) and (best is None or len(root) > best[1]):
            best = (i, len(root))
    return None if best is None else best[0]


def rebase(line: bytes, origin_root: bytes, index: int, roots: Sequence[str]) -> bytes:
    """*line* with its path moved from the origin's root to this node's root of the same index.

    Nodes whose roots are the same paths (the usual case) get the line as it is. The result is
    checked by this node's own path policy like any other line.
    """
    parts = split_path(line)
    if parts is None or index >= len(roots):
        return line
    head, path, rest = parts
    own = roots[index].encode()
    if own == origin_root or not path.startswith(origin_root + b"/"):
        return line
    return head + own + path[len(origin_root) :] + rest
