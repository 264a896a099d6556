"""The whole config file, composed: the purge section and the Cache Daemon's fields, each checked by its half.

:func:`resolve` is the one entry point: load the file, apply command-line overrides, check each
half and the process-wide sections (``logging:``, ``metrics:``), and return :class:`Settings`, the
resolved value every service is built from. A :class:`ConfigError` is a configuration error:
twistd and the ``cachesvc`` command exit with :data:`EX_CONFIG` (78) on one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cachesvc.configfile import ConfigError, build, read_yaml_file, secret_warning

# Before anything imports twisted.internet.endpoints: it names sockets systemd passed without names.
from cachesvc.observe import sdlisten
from cachesvc.observe.logs import LogSettings, resolve_logging
from cachesvc.purge.clusterconfig import has_password
from cachesvc.purge.config import PurgeConfig, PurgeSettings, check_purge
from cachesvc.recache.settings import CacheDaemonConfig, RecacheSettings, check_recache, go_listen_endpoint

__all__ = ["EX_CONFIG", "Config", "ConfigError", "MetricsSettings", "Settings", "load", "resolve"]

EX_CONFIG = getattr(os, "EX_CONFIG", 78)
"""The exit status of a configuration error (sysexits.h): ``RestartPreventExitStatus=78`` in the unit."""


@dataclass
class Config(CacheDaemonConfig):
    """The file as written: EdgeComet's cache-daemon.yaml fields plus ``purge:``.

    ``purge`` is ``None`` when a file is given without a ``purge:`` section.
    """

    purge: PurgeConfig | None = None
    source: str | None = field(default=None, metadata={"internal": True})
    warnings: list[str] = field(default_factory=list, metadata={"internal": True})


@dataclass(frozen=True)
class MetricsSettings:
    """The one metrics port of the process (``metrics:``, EdgeComet's section)."""

    listen: str  # a Twisted endpoint string
    path: str
    namespace: str


@dataclass(frozen=True)
class Settings:
    """What will run: each half resolved and checked, or ``None`` when it is not configured.

    ``warnings`` are found while the files are read, before twistd's logging starts: the service
    logs them once it runs (a secret in a file other users can read). ``listen_option`` and
    ``root_options`` are the command line's overrides, applied again when SIGHUP re-reads *source*.
    """

    purge: PurgeSettings | None
    recache: RecacheSettings | None
    source: str | None = None
    warnings: tuple[str, ...] = ()
    logging: LogSettings = LogSettings()
    metrics: MetricsSettings | None = None
    listen_option: str | None = None
    root_options: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line of what runs where (systemd's ``STATUS=``)."""
        parts = []
        if self.purge is not None:
            roots = len(self.purge.roots)
            parts.append(f"purge on {self.purge.listen} ({roots} root{'s' if roots != 1 else ''})")
        if self.recache is not None:
            r = self.recache
            api = f", API on {r.api_listen}" if r.api_enabled else ""
            parts.append(f"recache {r.daemon_id}: {len(r.edge.hosts)} hosts{api}")
        if self.metrics is not None:
            parts.append(f"metrics on {self.metrics.listen}{self.metrics.path}")
        return "; ".join(parts) or "nothing configured"


def load(path: str | None) -> Config:
    """Read *path* (or return the defaults when it is ``None``) without checking anything beyond its shape."""
    if path is None:
        return Config(purge=PurgeConfig())
    data, mode = read_yaml_file(path, ConfigError)
    config = build(Config, data, "", path)
    config.source = path
    secrets = ["redis.password"] if config.redis.password else []
    cluster = config.purge.cluster if config.purge is not None else None
    if cluster is not None and has_password(cluster.redis):
        secrets.append("a Redis password in purge.cluster.redis")
    warning = secret_warning(path, mode, " and ".join(secrets)) if secrets else None
    config.warnings = [warning] if warning else []
    return config


def resolve(path: str | None, listen: str | None = None, roots: Sequence[str] = ()) -> Settings:
    """Load *path*, apply command-line overrides, and check everything that will run."""
    config = load(path)
    purge = config.purge
    if listen is not None or roots:
        purge = purge or PurgeConfig()
        if listen is not None:
            purge = replace(purge, listen=listen)
        if roots:
            purge = replace(purge, roots=list(roots))
    if purge is None and config.eg_config is None:
        raise ConfigError(
            f"{config.source}: nothing to run; add a purge: section or eg_config (see README), or pass --cache-root"
        )
    if purge is not None:  # before the endpoint is parsed: Twisted's parser raises IndexError for this
        sdlisten.check_listen(purge.listen, "purge.listen", config.source, "tcp:7836:interface=127.0.0.1")
    purge_settings = None if purge is None else check_purge(purge, config.source)
    recache = None if config.eg_config is None else check_recache(config, config.source)
    logs = resolve_logging(config.logging, config.source, {"daemon_id": recache.daemon_id} if recache else None)
    metrics = _metrics(config, recache)
    if recache is not None and recache.api_enabled:
        sdlisten.check_listen(recache.api_listen, "http_api.listen", config.source, ":10090")
    if metrics is not None:
        sdlisten.check_listen(metrics.listen, "metrics.listen", config.source, ":10099")
    return Settings(
        purge=purge_settings,
        recache=recache,
        source=config.source,
        warnings=(*config.warnings, *(recache.edge.warnings if recache else ()), *logs.warnings),
        logging=logs,
        metrics=metrics,
        listen_option=listen,
        root_options=tuple(roots),
    )


def _metrics(config: Config, recache: RecacheSettings | None) -> MetricsSettings | None:
    """The metrics port: the recache half's when it runs (its checks and defaults), else ``metrics:`` alone.

    Off unless ``metrics.enabled: true``, in both cases.
    """
    if recache is not None:
        if not recache.metrics_enabled:
            return None
        return MetricsSettings(recache.metrics_listen, recache.metrics_path, recache.metrics_namespace)
    m = config.metrics
    if not m.enabled:
        return None
    where = config.source or "config"
    if not m.listen:
        raise ConfigError(f"{where}: metrics.listen is required when metrics are enabled, e.g. :10099")
    try:
        listen = go_listen_endpoint(m.listen)
    except ValueError as e:
        raise ConfigError(f"{where}: metrics.listen: {e}") from None
    return MetricsSettings(listen, m.path or "/metrics", m.namespace or "edgecomet")
