"""What every port of the process needs to take many connections: a listen backlog, and open files.

Both halves use it: the purge port and the HTTP API listen with a backlog of :data:`LISTEN_BACKLOG`
unless their endpoint string sets one (Twisted's default, 50, made 1 of 100 quick connects wait
about 1 s), and the first of them to start raises the soft ``RLIMIT_NOFILE`` to the hard limit,
once for the process (the usual soft 1,024 is about 1,000 connections).
"""

from __future__ import annotations

import re
import resource

from twisted.application.service import Service
from twisted.logger import Logger

LISTEN_BACKLOG = 1024
"""The listen queue of the purge port and the HTTP API's port (Twisted's default is 50)."""


def with_backlog(listen: str, backlog: int = LISTEN_BACKLOG) -> str:
    """*listen* with ``backlog=`` added when it is a ``tcp:``/``tcp6:`` endpoint that sets none; else as given."""
    kind, _, rest = listen.partition(":")
    if kind.strip().lower() not in ("tcp", "tcp6") or not rest:
        return listen
    args = re.split(r"(?<!\\):", rest)
    positional = [a for a in args if "=" not in a]
    if any(a.split("=", 1)[0].strip() == "backlog" for a in args) or len(positional) > 2:
        return listen  # set already (tcp:PORT:INTERFACE:BACKLOG is the positional form)
    return f"{listen}:backlog={backlog}"


_raised = False


def raise_open_files_limit_once(log: Logger) -> int | None:
    """:func:`raise_open_files_limit` the first time in this process; later, the soft limit in force, unlogged.

    Whichever half starts first raises it (the purge service, or the recache half's
    :class:`OpenFilesLimit`); the other finds it raised.
    """
    global _raised
    if not _raised:
        _raised = True
        return raise_open_files_limit(log)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_open_files_limit(log: Logger) -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit and log it; return the soft limit now in force.

    A failure is logged, not fatal. ``None``: no limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    if hard != resource.RLIM_INFINITY and soft >= hard:
        log.info("open files limit: {soft} (the hard limit)", soft=soft)
        return soft
    wanted = hard
    if hard == resource.RLIM_INFINITY:
        try:  # Linux refuses an infinite RLIMIT_NOFILE; fs.nr_open is the ceiling
            with open("/proc/sys/fs/nr_open") as f:
                wanted = int(f.read())
        except (OSError, ValueError):
            wanted = 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (OSError, ValueError) as e:
        log.warn("cannot raise the open files limit from {soft} to {wanted}: {e}", soft=soft, wanted=wanted, e=e)
        return soft
    log.info("raised the open files limit from {soft} to {wanted}", soft=soft, wanted=wanted)
    return wanted


class OpenFilesLimit(Service):
    """Raises the open files limit when it starts (unless the process did already): the recache half's first child."""

    name = "open-files"
    log = Logger()

    def startService(self) -> None:
        Service.startService(self)
        raise_open_files_limit_once(self.log)
