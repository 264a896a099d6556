"""The whole config file, composed: the purge section and the Cache Daemon's fields, each checked by its half.

:func:`resolve` is the one entry point: load the file, apply command-line overrides, check each
half, and return :class:`Settings`, the resolved value every service is built from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cachesvc.configfile import ConfigError, build, read_yaml_file, secret_warning
from cachesvc.purge.config import PurgeConfig, PurgeSettings, check_purge
from cachesvc.recache.settings import CacheDaemonConfig, RecacheSettings, check_recache

__all__ = ["Config", "ConfigError", "Settings", "load", "resolve"]


@dataclass
class Config(CacheDaemonConfig):
    """The file as written: EdgeComet's cache-daemon.yaml fields plus ``purge:``.

    ``purge`` is ``None`` when a file is given without a ``purge:`` section.
    """

    purge: PurgeConfig | None = None
    source: str | None = field(default=None, metadata={"internal": True})
    warnings: list[str] = field(default_factory=list, metadata={"internal": True})


@dataclass(frozen=True)
class Settings:
    """What will run: each half resolved and checked, or ``None`` when it is not configured.

    ``warnings`` are found while the files are read, before twistd's logging starts: the service
    logs them once it runs (a secret in a file other users can read).
    """

    purge: PurgeSettings | None
    recache: RecacheSettings | None
    source: str | None = None
    warnings: tuple[str, ...] = ()


def load(path: str | None) -> Config:
    """Read *path* (or return the defaults when it is ``None``) without checking anything beyond its shape."""
    if path is None:
        return Config(purge=PurgeConfig())
    data, mode = read_yaml_file(path, ConfigError)
    config = build(Config, data, "", path)
    config.source = path
    warning = secret_warning(path, mode, "redis.password") if config.redis.password else None
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
    purge_settings = None if purge is None else check_purge(purge, config.source)
    recache = None if config.eg_config is None else check_recache(config, config.source)
    return Settings(
        purge=purge_settings,
        recache=recache,
        source=config.source,
        warnings=(*config.warnings, *(recache.edge.warnings if recache else ())),
    )
