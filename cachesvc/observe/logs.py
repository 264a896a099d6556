"""The process's log output, from the config file's ``logging:`` section (EdgeComet's fields), for both halves.

``logging.level`` (``debug``, ``info``, ``warn``, ``error``; default ``info``) applies to every
output that sets none; ``logging.console`` and ``logging.file`` each have ``enabled``, ``format``
and ``level``, as in EdgeComet, and the console is on when neither is enabled.

- **console** is where twistd itself would log: its standard output under ``-n`` (the journal,
  under systemd), the ``--logfile`` file (rotated on SIGUSR1 and at 1 MB, as twistd does), or
  syslog with ``--syslog`` (text only). ``format: console`` is twistd's own text line;
  ``format: json`` one JSON object per line.
- **file** is ``logging.file.path``, written by Twisted's ``LogFile``: rotated on SIGUSR1, and at
  ``rotation.max_size`` MB (default 100, as EdgeComet's rotation library), keeping
  ``rotation.max_backups`` old files (0: all). ``max_age`` and ``compress`` are not applied (a
  warning says so at start-up); leave those to logrotate.

A JSON line is ``{"time", "level", "namespace", "message", ...the event's fields}``: the time in
ISO 8601 (UTC, milliseconds), the message formatted, then every field the event was logged with
(``daemon_id`` too, when the recache half runs), serialised by ``twisted.logger.eventAsJSON``, and
a failure's traceback as ``failure``. The levels are changed in place on SIGHUP
(:meth:`LogControl.set_levels`); a change of outputs needs a restart.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import IO, Any, cast

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    eventAsJSON,
)
from twisted.python.logfile import LogFile

from cachesvc.configfile import ConfigError, label, shown
from cachesvc.observe.textformat import ClassicText, message
from cachesvc.recache.settings import LoggingConfig

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}
DEFAULT_MAX_SIZE_MB = 100
"""``rotation.max_size: 0`` means this, as in the rotation library EdgeComet's logger uses."""

_LEGACY_KEYS = frozenset({"message", "format", "isError", "system", "time", "why", "failure", "printed"})
"""Keys of events from ``twisted.python.log`` that repeat what the JSON line says already."""


@dataclass(frozen=True)
class Output:
    format: str  # "text" or "json"
    level: str  # a key of LEVELS
    path: str | None = None  # the file output's path
    max_bytes: int | None = None
    backups: int | None = None


@dataclass(frozen=True)
class LogSettings:
    """What ``logging:`` asks for, checked: the outputs and their levels."""

    level: str = "info"
    console: Output | None = Output("text", "info")
    file: Output | None = None
    fields: tuple[tuple[str, str], ...] = ()  # added to every JSON line (daemon_id)
    warnings: tuple[str, ...] = ()

    def levels(self) -> tuple[str, ...]:
        return tuple(o.level for o in (self.console, self.file) if o is not None)

    def outputs(self) -> LogSettings:
        """These settings with every level at ``info``: equal outputs compare equal."""
        def same(o: Output | None) -> Output | None:
            return None if o is None else replace(o, level="info")
        return replace(self, level="info", console=same(self.console), file=same(self.file), warnings=())


def resolve_logging(config: LoggingConfig, source: str | None, fields: Mapping[str, str] | None = None) -> LogSettings:
    """Check the ``logging:`` section and resolve EdgeComet's defaults."""

    def level(key: str, value: str, default: str) -> str:
        if value.lower() not in ("", *LEVELS):
            raise ConfigError(f"{label(key, source)} must be one of debug, info, warn, error; got {shown(value)}")
        return value.lower() or default

    glob = level("logging.level", config.level, "info")
    console_level = level("logging.console.level", config.console.level, glob)
    file_level = level("logging.file.level", config.file.level, glob)
    if config.format not in ("", "json", "console", "text"):
        raise ConfigError(f"{label('logging.format', source)} must be json or console, got {shown(config.format)}")
    glob_format = "json" if config.format == "json" else ""
    console_on = config.console.enabled or not config.file.enabled
    console = None
    if console_on:
        fmt = config.console.format or glob_format
        if fmt not in ("", "json", "console"):
            raise ConfigError(f"{label('logging.console.format', source)} must be json or console, got {shown(fmt)}")
        console = Output("json" if fmt == "json" else "text", console_level)
    file = None
    warnings: list[str] = []
    if config.file.enabled:
        f, rotation = config.file, config.file.rotation
        if not f.path:
            raise ConfigError(f"{label('logging.file.path', source)} is required when file logging is enabled")
        if f.format not in ("", "json", "text"):
            raise ConfigError(f"{label('logging.file.format', source)} must be json or text, got {shown(f.format)}")
        for key, value in (("max_size", rotation.max_size), ("max_age", rotation.max_age),
                           ("max_backups", rotation.max_backups)):
            if value < 0:
                raise ConfigError(f"{label('logging.file.rotation.' + key, source)} must be >= 0, got {value}")
        path = f.path
        if not os.path.isabs(path) and source:
            path = os.path.join(os.path.dirname(os.path.abspath(source)), path)
        _check_writable(path, source)
        file = Output("json" if (f.format or glob_format) == "json" else "text", file_level, path,
                      (rotation.max_size or DEFAULT_MAX_SIZE_MB) * 1024 * 1024, rotation.max_backups or None)
        if rotation.max_age or rotation.compress:
            warnings.append(f"{label('logging.file.rotation', source)}: max_age and compress are not applied by "
                            "cachesvc (max_size and max_backups are); rotate old files with logrotate")
    return LogSettings(glob, console, file, tuple(sorted((fields or {}).items())), tuple(warnings))


def _check_writable(path: str, source: str | None) -> None:
    where = label("logging.file.path", source)
    directory = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise ConfigError(f"{where}: {shown(path)} is a directory; give a file name in it")
    if not os.path.isdir(directory):
        raise ConfigError(
            f"{where}: the directory of {shown(path)} does not exist; create it (systemd: LogsDirectory=)"
        )
    target = path if os.path.exists(path) else directory
    if not os.access(target, os.W_OK):
        raise ConfigError(f"{where}: {shown(target)} is not writable by this user; fix its owner or mode")


# --- JSON lines ----------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
        return list(value)
    return str(value)


def json_record(event: LogEvent, fields: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The object a JSON line holds for *event*."""
    level = event.get("log_level")
    stamp = event.get("log_time")
    record: dict[str, Any] = {
        "time": None if stamp is None else
        datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "message": message(event),
    }
    record.update(fields or {})
    for key, value in event.items():
        if not key.startswith("log_") and key not in _LEGACY_KEYS and key not in record:
            record[key] = _plain(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getTraceback()
    return record


def json_line(event: LogEvent, fields: Mapping[str, str] | None = None) -> str:
    """One line of JSON for *event*, through twisted.logger's serialiser (bytes as latin-1, like it)."""
    return eventAsJSON(json_record(event, fields)) + "\n"


# --- the outputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Syslog:
    """twistd's ``--syslog``: the console output goes to syslog under *prefix*."""

    prefix: str


Console = IO[str] | LogFile | Syslog


def twistd_console(options: Mapping[str, Any] | None) -> Console:
    """Where twistd itself would log, from its own options (``--logfile``, ``--syslog``, ``--nodaemon``)."""
    if options is None:
        return sys.stdout
    if options.get("syslog"):
        return Syslog(str(options.get("prefix") or "twisted"))
    logfile = str(options.get("logfile") or "")
    if logfile == "-" or (options.get("nodaemon") and not logfile):
        return sys.stdout
    return cast(LogFile, LogFile.fromFullPath(logfile or "twistd.log"))


class _Levels(LogLevelFilterPredicate):
    """Twisted's level filter, remembering each namespace's level (it splits and joins the name per event).

    Levels are ``LogLevel`` constants (``Any``: their package has no type information).
    """

    def __init__(self, defaultLogLevel: Any = LogLevel.info) -> None:
        self._cache: dict[str, Any] = {}
        super().__init__(defaultLogLevel)

    def logLevelForNamespace(self, namespace: str) -> Any:
        level = self._cache.get(namespace)
        if level is None:
            level = self._cache[namespace] = super().logLevelForNamespace(namespace)
        return level

    def setLogLevelForNamespace(self, namespace: str, level: Any) -> None:
        super().setLogLevelForNamespace(namespace, level)
        self._cache.clear()

    def clearLogLevels(self) -> None:
        super().clearLogLevels()
        self._cache.clear()


class LogControl:
    """The observer for *settings*' outputs; its levels change in place, its files rotate on demand."""

    def __init__(self, settings: LogSettings, console: Console | None = None) -> None:
        self.settings = settings
        self.files: list[LogFile] = []
        self._predicates: dict[str, LogLevelFilterPredicate] = {}
        observers: list[ILogObserver] = []
        fields = dict(settings.fields)
        if settings.console is not None:
            sink = sys.stdout if console is None else console
            if isinstance(sink, LogFile):
                self.files.append(sink)
            observers.append(self._filtered("console", settings.console, self._writer(sink, settings.console, fields)))
        if settings.file is not None and settings.file.path is not None:
            f = settings.file
            logfile = LogFile.fromFullPath(f.path, rotateLength=f.max_bytes, maxRotatedFiles=f.backups)
            self.files.append(logfile)
            observers.append(self._filtered("file", f, self._writer(logfile, f, fields)))
        self.observer: ILogObserver = observers[0] if len(observers) == 1 else LogPublisher(*observers)

    @staticmethod
    def _writer(sink: Console, output: Output, fields: Mapping[str, str]) -> ILogObserver:
        if isinstance(sink, Syslog):
            from twisted.python.syslog import SyslogObserver

            return LegacyLogObserverWrapper(cast(Any, SyslogObserver(sink.prefix).emit))
        out = cast(IO[Any], sink)
        if output.format == "json":
            formatter: Callable[[LogEvent], str | None] = lambda event: json_line(event, fields)  # noqa: E731
            return FileLogObserver(out, formatter)
        return FileLogObserver(out, ClassicText())  # twistd's text lines, formatted faster

    def _filtered(self, name: str, output: Output, observer: ILogObserver) -> ILogObserver:
        predicate = _Levels(defaultLogLevel=LEVELS[output.level])
        self._predicates[name] = predicate
        return FilteringLogObserver(observer, [predicate])

    def set_levels(self, settings: LogSettings) -> None:
        """Apply *settings*' levels (its outputs must be these: see :meth:`LogSettings.outputs`)."""
        for name, output in (("console", settings.console), ("file", settings.file)):
            if output is not None and name in self._predicates:
                self._predicates[name].setLogLevelForNamespace("", LEVELS[output.level])
        self.settings = settings

    def rotate(self) -> None:
        for logfile in self.files:
            logfile.rotate()
