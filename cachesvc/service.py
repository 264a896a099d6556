"""``makeService(config)``: the one function that builds cachesvc's service tree.

The twistd plugin, ``cachesvc.tac`` and the tests all call it, so they run the same tree.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService

from cachesvc.config import Config
from cachesvc.purge.service import PurgeService


def makeService(config: Config, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    top = MultiService()
    if config.purge is not None:
        PurgeService(config.purge, reactor).setServiceParent(top)
    if config.settings is not None:
        from cachesvc.recache.service import RecacheService

        RecacheService(config.settings, reactor).setServiceParent(top)
    return top
