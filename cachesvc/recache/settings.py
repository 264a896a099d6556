"""Checks and defaults for the Cache Daemon's sections of the config file.

The rules and messages are the Go daemon's (``scheduler.tick_interval must be >= 100ms``…); where
the Go loader leaves a field empty, the default the EdgeComet documentation promises applies
(tick 1s, normal check 60s, queue 1000, 3 attempts, 5s base delay, 30% reserve, 60s per URL, the
API on :10090 with a 30s request timeout, metrics at /metrics).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cachesvc.configfile import ConfigError, GoDuration, shown
from cachesvc.durations import format_duration
from cachesvc.recache.edgeconfig import EdgeConfig, EdgeConfigError, load_edge_config

DEFAULT_API_LISTEN = ":10090"
LOG_LEVELS = ("", "debug", "info", "warn", "error")

# --- the Cache Daemon's fields of the config file (EdgeComet's cache-daemon.yaml), Go names ------
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
    max_connections: int = 256


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
    format: str = ""  # json | console: every output's format unless it sets its own
    console: ConsoleLogConfig = field(default_factory=ConsoleLogConfig)
    file: FileLogConfig = field(default_factory=FileLogConfig)


@dataclass
class MetricsConfig:
    enabled: bool = False
    listen: str = ""
    path: str = ""
    namespace: str = ""


@dataclass
class CacheDaemonConfig:
    """The Cache Daemon's top-level fields as written; the recache half runs when ``eg_config`` is set."""

    eg_config: str | None = None
    daemon_id: str = ""
    redis: RedisConfig = field(default_factory=RedisConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    internal_queue: InternalQueueConfig = field(default_factory=InternalQueueConfig)
    recache: RecacheConfig = field(default_factory=RecacheConfig)
    http_api: HTTPAPIConfig = field(default_factory=HTTPAPIConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)



@dataclass(frozen=True)
class RecacheSettings:
    """Everything the recache half needs, resolved and checked."""

    daemon_id: str
    redis_addr: str
    redis_password: str
    redis_db: int
    tick_interval: float
    normal_check_interval: float
    max_size: int
    max_retries: int
    retry_base_delay: float
    rs_capacity_reserved: float
    timeout_per_url: float
    high_queue_limit: int
    lease: float
    edge_gateways: tuple[str, ...]
    gateway_cooldown: float
    shutdown_grace: float
    api_enabled: bool
    api_listen: str  # a Twisted endpoint string
    request_timeout: float
    scheduler_control_api: bool
    max_body_size: int
    metrics_enabled: bool
    metrics_listen: str
    metrics_path: str
    metrics_namespace: str
    edge: EdgeConfig
    max_connections: int = 256  # open API connections at most; more are refused at once

    @property
    def normal_check_ticks(self) -> int:
        return max(1, int(round(self.normal_check_interval * 1e9)) // int(round(self.tick_interval * 1e9)))


def go_listen_endpoint(listen: str) -> str:
    """``:10090``, ``host:10090`` or ``10090`` (Go forms) to a Twisted endpoint; endpoint strings pass."""
    if listen.startswith(("tcp:", "tcp6:", "unix:", "systemd:", "ssl:")):
        return listen
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(
            f"{shown(listen)} has no valid port (1-65535); write :10090, 127.0.0.1:10090 or an endpoint like tcp:10090"
        )
    host = host.strip("[]")
    return f"tcp:{port}" + (f":interface={host}" if host else "")


def _port(listen: str) -> str | None:
    for part in listen.split(":"):
        if part.isdigit():
            return part
    return None


def check_recache(config: CacheDaemonConfig, source: str | None = None) -> RecacheSettings:
    """Check *config* with the Go daemon's rules, read the EG config it names, and resolve the defaults.

    *source* is the config file's path: messages start with it, and a relative ``eg_config`` is
    read from beside it.
    """
    where = source or "config"

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{where}: {message}")

    if not config.eg_config:
        raise fail("eg_config must be specified (the path of the Edge Gateway config)")
    if not config.daemon_id:
        raise fail("daemon_id must be specified (a name for this daemon in logs and /status)")
    if not config.redis.addr:
        raise fail("redis.addr must be specified, e.g. localhost:6379")
    if config.redis.db < 0:
        raise fail(f"redis.db must be >= 0, got {config.redis.db}")
    s, q, r, api, m = config.scheduler, config.internal_queue, config.recache, config.http_api, config.metrics
    tick = 1.0 if s.tick_interval is None else s.tick_interval
    if tick < 0.1 - 1e-12:
        raise fail(f"scheduler.tick_interval must be >= 100ms, got {format_duration(tick)}")
    normal = 60.0 if s.normal_check_interval is None else s.normal_check_interval
    if s.normal_check_interval is not None and normal and round(normal * 1e9) % round(tick * 1e9):
        raise fail(
            f"scheduler.normal_check_interval ({format_duration(normal)}) "
            f"must be a multiple of tick_interval ({format_duration(tick)})"
        )
    if q.max_size is not None and q.max_size <= 0:
        raise fail(f"internal_queue.max_size must be > 0, got {q.max_size}")
    if q.max_retries is not None and q.max_retries < 1:
        raise fail(f"internal_queue.max_retries must be >= 1, got {q.max_retries}")
    if q.retry_base_delay is not None and q.retry_base_delay < 0:
        raise fail(f"internal_queue.retry_base_delay must be >= 0, got {format_duration(q.retry_base_delay)}")
    if r.rs_capacity_reserved is not None and not 0.0 <= r.rs_capacity_reserved <= 1.0:
        raise fail(f"recache.rs_capacity_reserved must be between 0.0 and 1.0, got {r.rs_capacity_reserved}")
    if r.timeout_per_url is not None and r.timeout_per_url <= 0:
        raise fail("recache.timeout_per_url must be > 0, e.g. 60s")
    timeout_per_url = 60.0 if r.timeout_per_url is None else r.timeout_per_url
    lease = 2 * timeout_per_url if r.lease is None else r.lease
    if lease <= timeout_per_url:
        raise fail(f"recache.lease ({format_duration(lease)}) must be longer than "
                   f"timeout_per_url ({format_duration(timeout_per_url)}), "
                   "or entries still being sent would be handed out again")
    for i, url in enumerate(r.edge_gateways):
        if not url.startswith(("http://", "https://")):
            raise fail(f"recache.edge_gateways[{i}]: {shown(url)} is not a base URL; write e.g. http://10.0.0.5:10071")
    if r.gateway_cooldown < 0 or r.shutdown_grace < 0:
        raise fail("recache.gateway_cooldown and recache.shutdown_grace must be >= 0")
    if r.high_queue_limit < 0:
        raise fail(f"recache.high_queue_limit must be >= 0 (0 = no limit), got {r.high_queue_limit}")
    api_enabled = True if api.enabled is None else api.enabled
    api_listen = api.listen or DEFAULT_API_LISTEN
    try:
        api_endpoint = go_listen_endpoint(api_listen)
    except ValueError as e:
        raise fail(f"http_api.listen: {e}") from None
    if api.request_timeout is not None and api.request_timeout <= 0 and api_enabled:
        raise fail("http_api.request_timeout must be > 0 when the API is enabled, e.g. 30s")
    if api.max_body_size <= 0:
        raise fail(f"http_api.max_body_size must be > 0, got {api.max_body_size}")
    if api.max_connections <= 0:
        raise fail(f"http_api.max_connections must be > 0, got {api.max_connections}")
    metrics_endpoint = ""
    if m.enabled:
        if not m.listen:
            raise fail("metrics.listen is required when metrics are enabled, e.g. :10099")
        try:
            metrics_endpoint = go_listen_endpoint(m.listen)
        except ValueError as e:
            raise fail(f"metrics.listen: {e}") from None
        if api_enabled and _port(api_listen) is not None and _port(api_listen) == _port(m.listen):
            raise fail(f"http_api.listen ({api_listen}) and metrics.listen ({m.listen}) must differ")
    levels = {"logging.level": config.logging.level, "logging.console.level": config.logging.console.level,
              "logging.file.level": config.logging.file.level}
    for key, level in levels.items():
        if level.lower() not in LOG_LEVELS:
            raise fail(f"{key} must be one of debug, info, warn, error; got {shown(level)}")
    if config.logging.console.enabled and config.logging.console.format not in ("", "json", "console"):
        raise fail(f"logging.console.format must be json or console, got {shown(config.logging.console.format)}")
    if config.logging.file.enabled:
        if not config.logging.file.path:
            raise fail("logging.file.path is required when file logging is enabled")
        if config.logging.file.format not in ("", "json", "text"):
            raise fail(f"logging.file.format must be json or text, got {shown(config.logging.file.format)}")
    eg_path = config.eg_config
    if not os.path.isabs(eg_path) and source:
        eg_path = os.path.join(os.path.dirname(os.path.abspath(source)), eg_path)
    try:
        edge = load_edge_config(eg_path)
    except EdgeConfigError as e:
        raise ConfigError(f"{where}: eg_config: {e}") from None
    return RecacheSettings(
        daemon_id=config.daemon_id,
        redis_addr=config.redis.addr,
        redis_password=config.redis.password,
        redis_db=config.redis.db,
        tick_interval=tick,
        normal_check_interval=normal,
        max_size=1000 if q.max_size is None else q.max_size,
        max_retries=3 if q.max_retries is None else q.max_retries,
        retry_base_delay=q.retry_base_delay or 5.0,
        rs_capacity_reserved=0.30 if r.rs_capacity_reserved is None else r.rs_capacity_reserved,
        timeout_per_url=timeout_per_url,
        high_queue_limit=r.high_queue_limit,
        lease=lease,
        edge_gateways=tuple(u.rstrip("/") for u in r.edge_gateways),
        gateway_cooldown=r.gateway_cooldown,
        shutdown_grace=r.shutdown_grace,
        api_enabled=api_enabled,
        api_listen=api_endpoint,
        request_timeout=api.request_timeout or 30.0,
        scheduler_control_api=api.scheduler_control_api,
        max_body_size=api.max_body_size,
        metrics_enabled=m.enabled,
        metrics_listen=metrics_endpoint,
        metrics_path=m.path or "/metrics",
        metrics_namespace=m.namespace or "edgecomet",
        edge=edge,
        max_connections=api.max_connections,
    )
