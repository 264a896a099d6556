"""Connection pools and sites that do not log each connection or request at info.

An ``HTTPConnectionPool`` builds one ``_HTTP11ClientFactory`` per connection, and a Twisted factory
logs "Starting factory" and "Stopping factory" when it is ``noisy`` (the default): two info lines
per new connection to an Edge Gateway or an origin. :func:`quiet_pool` makes pools whose factories
are not. :class:`QuietSite` is a ``Site`` that writes no access-log line (the metrics port: one
line per scrape said nothing).
"""

from __future__ import annotations

from typing import Any

from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import Request
from twisted.web.resource import IResource
from twisted.web.server import Site


class QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    noisy = False


def quiet_pool(reactor: Any, persistent: bool = True) -> HTTPConnectionPool:
    """An ``HTTPConnectionPool`` whose connections log nothing when they open and close."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    # The pool's factory class is a documented-by-use private hook (the one place to change it).
    pool._factory = QuietHTTP11ClientFactory
    return pool


class QuietSite(Site):
    """A ``Site`` that logs neither its start and stop nor a line per request."""

    noisy = False

    def __init__(self, resource: IResource) -> None:
        Site.__init__(self, resource)

    def log(self, request: Request) -> None:
        pass
