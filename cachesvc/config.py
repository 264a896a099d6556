"""Typed configuration: dataclasses, strict YAML loading, and checks with actionable messages.

Every section is a dataclass; :func:`build` walks its type hints, so a new field is one line and
unknown keys, wrong types and bad durations are reported with the key's full path (``purge.roots[0]``).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Mapping, Sequence, TypeVar, Union

import yaml

from cachesvc.durations import HINT as DURATION_HINT
from cachesvc.durations import parse_duration


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key, the value and the fix."""


DURATION = "duration"
"""Marker for ``Annotated[float, DURATION]``: seconds, written in the config as ``30s``, ``1m30s``."""

Duration = Annotated[float, DURATION]

GO_DURATION = "go-duration"
"""Marker for EdgeComet fields: like ``DURATION``, and a bare integer is nanoseconds, as Go reads it."""

GoDuration = Annotated[float, GO_DURATION]

T = TypeVar("T")


@dataclass
class ZoneConfig:
    """One nginx cache zone, described as nginx's ``fastcgi_cache_path``/``fastcgi_cache_key`` do."""

    hosts: list[str]
    path: str
    levels: str = "1:2"
    key: str = "$scheme$request_method$host$request_uri"
    methods: list[str] = field(default_factory=lambda: ["GET", "HEAD"])


@dataclass
class PurgeConfig:
    """The ``purge:`` section: the SpinupWP-compatible purge service."""

    listen: str = "tcp:7836:interface=127.0.0.1"
    roots: list[str] = field(default_factory=lambda: ["/cache"])
    idle_timeout: Duration = 30.0
    max_line_length: int = 4096
    trash_dir: str | None = None
    zones: list[ZoneConfig] = field(default_factory=list)


# --- the EdgeComet Cache Daemon's sections (cache-daemon.yaml), Go field names -------------------
# ``None`` means "not in the file": the documented default applies; an explicit value is checked
# with the Go daemon's rules and messages.


@dataclass
class RedisConfig:
    addr: str = ""
    password: str = ""
    db: int = 0


@dataclass
class SchedulerConfig:
    tick_interval: GoDuration | None = None
    normal_check_interval: GoDuration | None = None


@dataclass
class InternalQueueConfig:
    max_size: int | None = None
    max_retries: int | None = None
    retry_base_delay: GoDuration | None = None


@dataclass
class RecacheConfig:
    rs_capacity_reserved: float | None = None
    timeout_per_url: GoDuration | None = None
    high_queue_limit: int = 1000
    lease: GoDuration | None = None  # default: 2 x timeout_per_url
    edge_gateways: list[str] = field(default_factory=list)  # base URLs, when none is registered
    gateway_cooldown: GoDuration = 5.0
    shutdown_grace: GoDuration = 10.0


@dataclass
class HTTPAPIConfig:
    enabled: bool | None = None
    listen: str = ""
    request_timeout: GoDuration | None = None
    scheduler_control_api: bool = False
    max_body_size: int = 4 * 1024 * 1024


@dataclass
class ConsoleLogConfig:
    enabled: bool = False
    format: str = ""
    level: str = ""


@dataclass
class RotationConfig:
    max_size: int = 0
    max_age: int = 0
    max_backups: int = 0
    compress: bool = False


@dataclass
class FileLogConfig:
    enabled: bool = False
    path: str = ""
    format: str = ""
    level: str = ""
    rotation: RotationConfig = field(default_factory=RotationConfig)


@dataclass
class LoggingConfig:
    level: str = ""
    console: ConsoleLogConfig = field(default_factory=ConsoleLogConfig)
    file: FileLogConfig = field(default_factory=FileLogConfig)


@dataclass
class MetricsConfig:
    enabled: bool = False
    listen: str = ""
    path: str = ""
    namespace: str = ""


@dataclass
class Config:
    """The whole file: EdgeComet's cache-daemon.yaml fields plus ``purge:``.

    ``purge`` is ``None`` when a file is given without a ``purge:`` section; the recache half runs
    when ``eg_config`` is set.
    """

    purge: PurgeConfig | None = None
    eg_config: str | None = None
    daemon_id: str = ""
    redis: RedisConfig = field(default_factory=RedisConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    internal_queue: InternalQueueConfig = field(default_factory=InternalQueueConfig)
    recache: RecacheConfig = field(default_factory=RecacheConfig)
    http_api: HTTPAPIConfig = field(default_factory=HTTPAPIConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str | None = field(default=None, metadata={"internal": True})
    settings: Any = field(default=None, metadata={"internal": True})  # RecacheSettings, once checked


def read_yaml_mapping(path: str, error: type[Exception], what: str = "config file") -> dict[str, Any]:
    """The YAML file *path* as a mapping (empty file: ``{}``); *error* says what is wrong with it."""
    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of settings at the top level, got {_kind(data)}")
    return data


def load(path: str | None) -> Config:
    """Read *path* (or return the defaults when it is ``None``) without touching anything else."""
    if path is None:
        return Config(purge=PurgeConfig())
    data = read_yaml_mapping(path, ConfigError)
    config = build(Config, data, "", path)
    config.source = path
    return config


def build(cls: type[T], data: Any, where: str, source: str | None = None) -> T:
    """Make a *cls* dataclass from parsed YAML *data*, refusing anything the class does not declare."""
    label = _label(where, source)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label}: expected a mapping of settings, got {_kind(data)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise ConfigError(
                f"{_label(path, source)}: unknown configuration field (check for typos); "
                f"known fields here: {', '.join(sorted(known))}"
            )
        kwargs[key] = _convert(hints[key], value, path, source)
    for name, f in known.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            path = f"{where}.{name}" if where else name
            raise ConfigError(f"{_label(path, source)}: required field is missing")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, path: str, source: str | None) -> Any:
    label = _label(path, source)
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *marks = typing.get_args(hint)
        if DURATION in marks:
            return _duration(value, label)
        if GO_DURATION in marks:
            if isinstance(value, int) and not isinstance(value, bool):
                return value / 1e9  # Go reads a bare integer as nanoseconds
            return _duration(value, label)
        return _convert(base, value, path, source)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, path, source)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{label}: expected a list, got {_kind(value)} {value!r}")
        return [_convert(item, v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return build(hint, {} if value is None else value, path, source)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{label}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{label}: expected a whole number, got {_kind(value)} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{label}: expected a number, got {_kind(value)} {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{label}: expected a string, got {_kind(value)} {value!r}; quote it")
        return value
    raise TypeError(f"config field {path} has unsupported type {hint!r}")  # pragma: no cover


def _duration(value: Any, label: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return 0.0
    if not isinstance(value, str):
        raise ConfigError(f"{label}: got {value!r}; {DURATION_HINT}")
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ConfigError(f"{label}: {e}") from None


def _label(path: str, source: str | None) -> str:
    where = path or "top level"
    return f"{source}: {where}" if source else where


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def check_purge(purge: PurgeConfig, source: str | None = None) -> None:
    """Refuse a purge section that cannot run safely: the daemon deletes with privileges."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, purge.listen)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(
            f"{_label('purge.listen', source)}: {purge.listen!r} is not a Twisted server endpoint "
            f"({e}); write e.g. tcp:7836:interface=127.0.0.1 or unix:/run/cachesvc/purge.sock"
        ) from None
    if purge.idle_timeout <= 0:
        raise ConfigError(f"{_label('purge.idle_timeout', source)}: must be > 0, e.g. 30s")
    if not 1 <= purge.max_line_length <= 1 << 20:
        raise ConfigError(
            f"{_label('purge.max_line_length', source)}: {purge.max_line_length} is out of range; use 1 to 1048576 (default 4096)"
        )
    if not purge.roots:
        raise ConfigError(f"{_label('purge.roots', source)}: list at least one cache root, e.g. [/cache]")
    normalised: list[str] = []
    for i, root in enumerate(purge.roots):
        label = _label(f"purge.roots[{i}]", source)
        if not root.startswith("/"):
            raise ConfigError(f"{label}: {root!r} is relative; give the absolute path of the cache directory")
        norm = os.path.normpath(root)
        if norm.startswith("//"):
            norm = "/" + norm.lstrip("/")
        if norm == "/":
            raise ConfigError(f"{label}: {root!r} would let clients delete the whole filesystem; name the cache directory")
        if not os.path.isdir(norm):
            what = "does not exist" if not os.path.exists(norm) else "is not a directory"
            raise ConfigError(f"{label}: {root!r} {what}; create it (owned by the nginx user) or fix the path")
        if norm in normalised:
            raise ConfigError(f"{label}: {root!r} is listed twice")
        normalised.append(norm)
    purge.roots = normalised
    purge.trash_dir = _check_trash(purge, source)
    from cachesvc.purge.zones import ZoneMap

    for i, zone in enumerate(purge.zones):
        try:
            ZoneMap.check(zone, normalised)
        except ValueError as e:
            raise ConfigError(f"{_label(f'purge.zones[{i}]', source)}: {e}") from None


def _check_trash(purge: PurgeConfig, source: str | None) -> str:
    """The trash must be outside every nginx zone: a root's hidden child, or outside the roots."""
    label = _label("purge.trash_dir", source)
    trash = purge.trash_dir or os.path.join(purge.roots[0], ".cachesvc-trash")
    if not trash.startswith("/"):
        raise ConfigError(f"{label}: {trash!r} is relative; give an absolute path on the cache's filesystem")
    trash = os.path.normpath(trash)
    for root in purge.roots:
        if trash == root or root.startswith(trash + "/"):
            raise ConfigError(f"{label}: {trash!r} would contain the cache root {root}; use e.g. {root}/.cachesvc-trash")
        if trash.startswith(root + "/") and os.path.dirname(trash) != root:
            raise ConfigError(
                f"{label}: {trash!r} is inside a cache zone, where nginx's cache loader deletes foreign files; "
                f"use a direct child of the root such as {root}/.cachesvc-trash"
            )
    parent = os.path.dirname(trash)
    if not os.path.isdir(parent):
        raise ConfigError(f"{label}: the parent of {trash!r} does not exist; create it or choose another path")
    if os.path.islink(trash) or (os.path.exists(trash) and not os.path.isdir(trash)):
        raise ConfigError(f"{label}: {trash!r} exists and is not a plain directory; remove it or choose another path")
    return trash


def resolve(path: str | None, listen: str | None = None, roots: Sequence[str] = ()) -> Config:
    """Load *path*, apply command-line overrides, and check everything that will run."""
    config = load(path)
    if listen is not None or roots:
        if config.purge is None:
            config.purge = PurgeConfig()
        if listen is not None:
            config.purge.listen = listen
        if roots:
            config.purge.roots = list(roots)
    if config.purge is None and config.eg_config is None:
        raise ConfigError(
            f"{config.source}: nothing to run; add a purge: section or eg_config (see README), or pass --cache-root"
        )
    if config.purge is not None:
        check_purge(config.purge, config.source)
    if config.eg_config is not None:
        from cachesvc.recache.settings import check_recache

        check_recache(config)
    return config
