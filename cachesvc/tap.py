"""``twistd cachesvc``: command-line options and the service maker the plugin points at.

A configuration error ends ``twistd`` here, before anything runs: one line on standard error (the
file, the key, the value and the fix; no usage text) and exit status 78 (``EX_CONFIG``), which
the systemd unit's ``RestartPreventExitStatus=78`` keeps from being restarted in a loop.
Mistyped options are still twistd's usage errors (status 1, with the usage).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from twisted.application.service import IService
from twisted.copyright import version as twisted_version
from twisted.python import usage

from cachesvc import __version__
from cachesvc import config as configuration
from cachesvc.observe.logs import twistd_console
from cachesvc.service import makeService as buildService


class Options(usage.Options):
    synopsis = "[--config FILE] [--purge-listen ENDPOINT] [--cache-root DIR ...]"
    longdesc = (
        "Run cachesvc: the SpinupWP-compatible purge service (127.0.0.1:7836, cache root /cache by "
        "default) and, when the config file sets eg_config, the EdgeComet-compatible recache daemon "
        "(its scheduler, HTTP API and metrics), in one process. The YAML config file holds both "
        "halves (purge: and EdgeComet's cache-daemon.yaml fields) and logging: and metrics: for the "
        "process; command-line options override it. Check a file with `cachesvc check-config FILE`. "
        "SIGHUP re-reads the file; SIGUSR1 rotates log files. A configuration error exits with status 78. "
        f"Read more in {os.path.join(sys.prefix, 'share', 'doc', 'cachesvc', 'README.md')}; the systemd units "
        f"and a Supervisor example are in {os.path.join(sys.prefix, 'share', 'cachesvc')}."
    )
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

    def opt_version(self) -> None:
        """Display cachesvc's version (and Twisted's) and exit."""
        print(f"cachesvc {__version__} (Twisted {twisted_version}, Python {platform.python_version()})")
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            self.settings = configuration.resolve(self["config"], self["purge-listen"], self["cache-root"])
        except configuration.ConfigError as e:
            config_error(e)


def config_error(error: configuration.ConfigError) -> None:
    """Print *error* as the one line it is and exit with ``EX_CONFIG``."""
    sys.stderr.write(f"cachesvc: configuration error: {error}\n")
    sys.stderr.flush()
    raise SystemExit(configuration.EX_CONFIG)


def makeService(options: Options) -> IService:
    parent: Any = getattr(options, "parent", None)  # twistd's own options, when run by twistd
    return buildService(options.settings, console=twistd_console(parent))
