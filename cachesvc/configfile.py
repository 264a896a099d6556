"""The generic config loader: the error type, a YAML mapping reader and the dataclass builder.

It knows nothing of either half. Every section is a dataclass; :func:`build` walks its type hints,
so a new field is one line and unknown keys, wrong types and bad durations are reported with the
key's full path (``purge.roots[0]``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar, Union, cast

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


def build(cls: type[T], data: Any, where: str, source: str | None = None) -> T:
    """Make a *cls* dataclass from parsed YAML *data*, refusing anything the class does not declare."""
    here = label(where, source)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{here}: expected a mapping of settings, got {_kind(data)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    known = {f.name: f for f in dataclasses.fields(cast(Any, cls)) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
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
            raise ConfigError(f"{here}: expected a list, got {_kind(value)} {value!r}")
        return [_convert(item, v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, {} if value is None else value, path, source)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{here}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{here}: expected a whole number, got {_kind(value)} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{here}: expected a number, got {_kind(value)} {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{here}: expected a string, got {_kind(value)} {value!r}; quote it")
        return value
    raise TypeError(f"config field {path} has unsupported type {hint!r}")  # pragma: no cover


def _duration(value: Any, here: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return 0.0
    if not isinstance(value, str):
        raise ConfigError(f"{here}: got {value!r}; {DURATION_HINT}")
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


class _ParseOnly:
    """Stands in for a reactor while an endpoint string is parsed: parsing never touches one."""


def check_server_endpoint(description: str, where: str, source: str | None, example: str) -> None:
    """Raise :class:`ConfigError` unless *description* is a Twisted server endpoint string."""
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(_ParseOnly(), description)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(
            f"{label(where, source)}: {description!r} is not a Twisted server endpoint ({e}); write e.g. {example}"
        ) from None
