"""inotify for the tag index: ``twisted.internet.inotify.INotify``, with its events read here.

Twisted's own dispatch drops the queue-overflow event (it belongs to no watch) and closes the whole
descriptor when any watched directory is deleted; an index needs the first and cannot afford the
second. So events are handed on raw, as (watch descriptor, mask, name) batches.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.inotify import INotify
from twisted.python._inotify import INotifyError
from twisted.python.filepath import FilePath

Event = tuple[int, int, bytes]  # (watch descriptor, mask, name)
_EVENT = struct.Struct("=iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


class Notifier(INotify):
    """``INotify`` handing every event batch it reads to *handler*; ``add``/``remove`` watches by path."""

    def __init__(self, reactor: Any, handler: Callable[[list[Event]], None]) -> None:
        INotify.__init__(self, reactor)
        self._handler = handler

    def add(self, path: bytes, mask: int) -> int:
        return int(self._inotify.add(self._fd, FilePath(path), mask))

    def remove(self, wd: int) -> None:
        with contextlib.suppress(INotifyError, KeyError):
            self._inotify.remove(self._fd, wd)

    def doRead(self) -> None:
        self.drain()

    def drain(self) -> None:
        """Read and hand on every event queued now (the reactor's read, and a purge's before it looks)."""
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                return
            if not data:
                return
            self._doRead(data)

    def _doRead(self, in_: bytes) -> None:
        buffer = self._buffer + in_
        events: list[Event] = []
        offset = 0
        while len(buffer) - offset >= _EVENT.size:
            wd, mask, _cookie, size = _EVENT.unpack_from(buffer, offset)
            end = offset + _EVENT.size + size
            if len(buffer) < end:
                break
            events.append((wd, mask, buffer[offset + _EVENT.size : end].rstrip(b"\0")))
            offset = end
        buffer = buffer[offset:]
        self._buffer = buffer
        if events:
            self._handler(events)
