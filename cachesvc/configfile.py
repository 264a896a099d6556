"""The generic config loader: the error type, a YAML mapping reader and the dataclass builder.

It knows nothing of either half. Every section is a dataclass; :func:`build` walks its type hints,
so a new field is one line and unknown keys, wrong types and bad durations are reported with the
key's full path (``purge.roots[0]``).

A config file is input from whoever can write it, so reading one is bounded: files over
:data:`MAX_FILE_BYTES` are refused unread, :mod:`cachesvc.yamlbounds` refuses alias bombs, deep
nesting and huge integers while it parses, and a message shows a bad value through :func:`shown`,
never whole.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import reprlib
import shlex
import stat
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar, Union, cast

import yaml

from cachesvc.durations import HINT as DURATION_HINT
from cachesvc.durations import parse_duration
from cachesvc.yamlbounds import Refused, load_bounded


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key, the value and the fix."""


DURATION = "duration"
"""Marker for ``Annotated[float, DURATION]``: seconds, written in the config as ``30s``, ``1m30s``."""

Duration = Annotated[float, DURATION]

GO_DURATION = "go-duration"
"""Marker for EdgeComet fields: like ``DURATION``, and a bare integer is nanoseconds, as Go reads it."""

GoDuration = Annotated[float, GO_DURATION]

T = TypeVar("T")


MAX_FILE_BYTES = 1024 * 1024
"""Config files (the cachesvc config, the EG config and its host files) larger than this are refused unread."""

SHOWN_CHARS = 80
"""About how much of a value a message shows; :func:`shown` says how long the whole is."""


def read_yaml_file(path: str, error: type[Exception], what: str = "config file") -> tuple[dict[str, Any], int]:
    """The YAML file *path* as a mapping (empty file: ``{}``) and its ``st_mode``; *error* says what is wrong.

    Files over :data:`MAX_FILE_BYTES` are refused before they are parsed.
    """
    limit = f"the limit is {MAX_FILE_BYTES:,} bytes (1 MiB); a real {what} is far smaller: check the path"
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if info.st_size > MAX_FILE_BYTES:
                raise error(f"{path}: {what} is {info.st_size:,} bytes; {limit}")
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise error(f"cannot read {what} {shown(path) if len(path) > 200 else path}: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:  # not a regular file, or it grew while read
        raise error(f"{path}: {what} is over {MAX_FILE_BYTES:,} bytes; {limit}")
    try:
        data = load_bounded(raw, path)
    except Refused as e:
        raise error(f"{path}: line {e.mark.line + 1}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {_clip(str(e), 400)}") from None
    except RecursionError:  # not expected within MAX_DEPTH; never a traceback
        raise error(f"{path}: nested too deeply to read; no setting nests more than a few levels") from None
    if data is None:
        return {}, info.st_mode
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of settings at the top level, got {_kind(data)}")
    return data, info.st_mode


def secret_warning(path: str, mode: int, secret: str) -> str | None:
    """A warning when the file *path* (its ``st_mode`` *mode*), which holds *secret*, is readable by others."""
    if not mode & stat.S_IROTH:
        return None
    quoted = shlex.quote(path)
    return (
        f"{path} holds {secret} and is readable by every user on this machine (mode {stat.S_IMODE(mode):04o}); "
        f"run chmod 600 {quoted} (or chmod 640 {quoted} with the file's group set to the daemon's group)"
    )


class _ShortRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 6
        self.maxstring = self.maxother = SHOWN_CHARS // 2  # a string inside a list, so the whole fits
        self.maxlong = 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 1000:  # repr() of an int over 4,300 digits raises ValueError
            return f"<an integer of about {int(x.bit_length() * 0.30103):,} digits>"
        return super().repr_int(x, level)


_SHORT = _ShortRepr()


def shown(value: Any) -> str:
    """*value*'s repr for a message: at most about :data:`SHOWN_CHARS` characters, saying how long the whole is.

    The work is bounded too: a 50 MB string or a list of a billion items is never rendered whole.
    """
    if isinstance(value, (str, bytes)):
        head = value[:SHOWN_CHARS]
        text = repr(head)
        if len(value) <= SHOWN_CHARS and len(text) <= SHOWN_CHARS + 3:
            return text
        while len(text) > SHOWN_CHARS and head:
            head = head[: len(head) // 2]
            text = repr(head)
        return f"{text[:-1]}…{text[-1]} ({len(value):,} characters)"
    text = _SHORT.repr(value)
    if len(text) > SHOWN_CHARS:
        text = text[:SHOWN_CHARS] + "…"
    if isinstance(value, (list, tuple, dict, set, frozenset)) and ("..." in text or text.endswith("…")):
        text += f" ({len(value):,} item{'' if len(value) == 1 else 's'})"
    return text


def segment(key: Any) -> str:
    """A mapping key as a part of a key path (``purge.zones``): itself when short, else :func:`shown`."""
    if isinstance(key, str) and len(key) <= SHOWN_CHARS and key.isprintable():
        return key
    return shown(key)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def build(cls: type[T], data: Any, where: str, source: str | None = None) -> T:
    """Make a *cls* dataclass from parsed YAML *data*, refusing anything the class does not declare."""
    here = label(where, source)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{here}: expected a mapping of settings, got {_kind(data)}")
    hints, known = _schema(cast(Any, cls))
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{segment(key)}" if where else segment(key)
        if key not in known:
            raise ConfigError(
                f"{label(path, source)}: unknown configuration field (check for typos); "
                f"known fields here: {', '.join(sorted(known))}"
            )
        kwargs[key] = _convert(hints[key], value, path, source)
    for name, f in known.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            path = f"{where}.{name}" if where else name
            raise ConfigError(f"{label(path, source)}: required field is missing")
    return cls(**kwargs)


@functools.cache
def _schema(cls: type[Any]) -> tuple[dict[str, Any], dict[str, dataclasses.Field[Any]]]:
    """*cls*'s type hints and the fields a file may set (worked out once: a file may hold 15,000 zones)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return hints, {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _convert(hint: Any, value: Any, path: str, source: str | None) -> Any:
    here = label(path, source)
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *marks = typing.get_args(hint)
        if DURATION in marks:
            return _duration(value, here)
        if GO_DURATION in marks:
            if isinstance(value, int) and not isinstance(value, bool):
                return value / 1e9  # Go reads a bare integer as nanoseconds
            return _duration(value, here)
        return _convert(base, value, path, source)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, path, source)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{here}: expected a list, got {_kind(value)} {shown(value)}")
        return [_convert(item, v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, {} if value is None else value, path, source)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{here}: expected true or false, got {shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{here}: expected a whole number, got {_kind(value)} {shown(value)}")
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{here}: {shown(value)} is out of range; whole numbers fit in 64 bits")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{here}: expected a number, got {_kind(value)} {shown(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{here}: expected a string, got {_kind(value)} {shown(value)}; quote it")
        return value
    raise TypeError(f"config field {path} has unsupported type {hint!r}")  # pragma: no cover


def _duration(value: Any, here: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return 0.0
    if not isinstance(value, str):
        raise ConfigError(f"{here}: got {shown(value)}; {DURATION_HINT}")
    if len(value) > SHOWN_CHARS:  # parse_duration's message would repeat it whole
        raise ConfigError(f"{here}: {shown(value)} is not a duration; {DURATION_HINT}")
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ConfigError(f"{here}: {e}") from None


def label(path: str, source: str | None) -> str:
    """``file: key.path``, the prefix of every config message."""
    where = path or "top level"
    return f"{source}: {where}" if source else where


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


MAX_ENDPOINT_CHARS = 4096
"""Endpoint strings longer than this are refused unparsed (a Unix socket path is at most 108 bytes)."""


class _ParseOnly:
    """Stands in for a reactor while an endpoint string is parsed: parsing never touches one."""


def check_server_endpoint(description: str, where: str, source: str | None, example: str) -> None:
    """Raise :class:`ConfigError` unless *description* is a Twisted server endpoint string."""
    from twisted.internet.endpoints import serverFromString

    try:
        if len(description) > MAX_ENDPOINT_CHARS:  # Twisted's parser takes seconds over a long one
            raise ValueError(f"longer than {MAX_ENDPOINT_CHARS:,} characters")
        serverFromString(_ParseOnly(), description)
    except IndexError:  # systemd:…:index=N with fewer sockets passed (or none: not started by systemd)
        raise ConfigError(
            f"{label(where, source)}: {shown(description)} names a socket systemd did not pass to this process; "
            "start it from its .socket unit (or with systemd-socket-activate), or listen on e.g. "
            f"{example}"
        ) from None
    except (ValueError, TypeError, KeyError) as e:
        why = f" ({_clip(str(e), SHOWN_CHARS)})"
        raise ConfigError(
            f"{label(where, source)}: {shown(description)} is not a Twisted server endpoint{why}; write e.g. {example}"
        ) from None
