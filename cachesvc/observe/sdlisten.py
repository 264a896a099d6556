"""Sockets passed by systemd (``LISTEN_FDS``): the ``systemd:`` endpoint strings checked before anything listens.

Twisted reads ``LISTEN_FDS``, ``LISTEN_PID`` and ``LISTEN_FDNAMES`` once, when
:mod:`twisted.internet.endpoints` is imported, and drops every passed socket when
``LISTEN_FDNAMES`` is missing, which is how ``systemd-socket-activate`` without ``--fdname`` (and
systemd before 227) starts a service: ``systemd:domain=INET:index=0`` then ends in an
``IndexError``. Where the names are missing, libsystemd's ``sd_listen_fds_with_names()`` calls every
socket ``unknown``; importing this module does the same in the environment, so Twisted's parser
sees the sockets. It must therefore be imported before :mod:`twisted.internet.endpoints` (it is:
:mod:`cachesvc.config` imports it, and the plugin and the ``.tac`` import that first).

:func:`check_listen` turns a ``systemd:`` endpoint that names no passed socket into a
:class:`~cachesvc.configfile.ConfigError` with the fix, where Twisted would raise ``IndexError``
or ``KeyError`` while the service tree is built.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

from cachesvc.configfile import ConfigError, label, shown

UNNAMED = "unknown"
"""The name libsystemd gives a passed socket when ``LISTEN_FDNAMES`` is not set."""


def name_unnamed_sockets(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set ``LISTEN_FDNAMES`` to ``unknown`` for each passed socket when it is missing; whether it did."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()) or env.get("LISTEN_FDNAMES"):
        return False
    try:
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return False
    if count <= 0:
        return False
    env["LISTEN_FDNAMES"] = ":".join([UNNAMED] * count)
    return True


name_unnamed_sockets()


def passed_sockets() -> tuple[int, list[str]]:
    """How many sockets systemd passed and their (distinct) names, as Twisted's ``systemd:`` parser sees them."""
    from twisted.internet import endpoints

    # Twisted keeps what it read from the environment in a private class attribute; without it (a
    # Twisted that changed), nothing is checked here and Twisted's own error stands.
    passed = getattr(getattr(endpoints, "_SystemdParser", None), "_sddaemon", None)
    if passed is None:
        return -1, []
    return len(passed.inheritedDescriptors()), list(passed.inheritedNamedDescriptors())


def _arguments(description: str) -> dict[str, str]:
    rest = description.partition(":")[2]
    found = {}
    for part in re.split(r"(?<!\\):", rest):
        key, sep, value = part.partition("=")
        if sep:
            found[key.strip()] = value.strip()
    return found


def check_listen(description: str, where: str, source: str | None, example: str) -> None:
    """Raise :class:`ConfigError` when the ``systemd:`` endpoint *description* names no socket systemd passed."""
    if description.partition(":")[0].strip().lower() != "systemd":
        return
    count, names = passed_sockets()
    if count < 0:
        return
    args = _arguments(description)
    start = "start cachesvc through its socket unit (systemctl start cachesvc.socket) or systemd-socket-activate"
    if count == 0:
        raise ConfigError(
            f"{label(where, source)}: {shown(description)} listens on a socket passed by systemd, and none was "
            f"passed (LISTEN_FDS is not set for this process); {start}, or listen on {example}"
        )
    if "name" in args and "index" not in args and args["name"] not in names:
        raise ConfigError(
            f"{label(where, source)}: {shown(description)}: no socket named {shown(args['name'])} was passed "
            f"(passed: {', '.join(names) or 'none'}); set FileDescriptorName={args['name']} in the .socket unit "
            f"(or systemd-socket-activate --fdname={args['name']}), or use index=0"
        )
    if "index" in args and "name" not in args:
        index = args["index"]
        if not index.isdigit() or int(index) >= count:
            raise ConfigError(
                f"{label(where, source)}: {shown(description)}: systemd passed {count} socket(s), so index= "
                f"is 0 to {count - 1}; got {shown(index)}"
            )
