"""``twistd cachesvc``: command-line options and the service maker the plugin points at."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from cachesvc import config as configuration
from cachesvc.service import makeService as buildService


class Options(usage.Options):
    synopsis = "[--config FILE] [--purge-listen ENDPOINT] [--cache-root DIR ...]"
    longdesc = "Run cachesvc. Command-line options override the config file."
    optParameters = [
        ["config", "c", None, "YAML config file (defaults apply when omitted)."],
        ["purge-listen", None, None, "Purge service endpoint, e.g. tcp:7836:interface=127.0.0.1."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["cache-root"] = []

    def opt_cache_root(self, path: str) -> None:
        """A cache root below which purges may delete (repeat for several; replaces purge.roots)."""
        self["cache-root"].append(path)

    def postOptions(self) -> None:
        try:
            self.settings = configuration.resolve(self["config"], self["purge-listen"], self["cache-root"])
        except configuration.ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    return buildService(options.settings)
