"""``cachesvc check-config``: every error the loader can find at once, then what would run.

The loader stops at its first error. So each check (the file's shape, the purge half, the
recache half, ``logging:``) runs until it passes: each error is noted, the setting it names is
taken out of the data (its default applies) and the check runs again (:class:`Pruner`). Last,
the file is read exactly as the daemon reads it (:func:`cachesvc.config.resolve`), which also
finds what no piece shows alone (nothing to run, ``metrics:``).

A ``systemd:`` purge endpoint is checked for its form only: the command is not started by systemd,
so no socket was passed to it (the daemon checks that one at start-up).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import yaml

from cachesvc.cli_net import split_endpoint
from cachesvc.config import Config, ConfigError, Settings, load, resolve
from cachesvc.configfile import build, label, read_yaml_file
from cachesvc.durations import format_duration
from cachesvc.observe.logs import resolve_logging
from cachesvc.purge.config import PurgeConfig, check_purge
from cachesvc.recache.settings import check_recache

PLACEHOLDER_LISTEN = "tcp:7836:interface=127.0.0.1"
MAX_ERRORS = 100  # reported at most, per check
T = TypeVar("T")
SECRETS = {"password", "redis_password", "auth_key"}
NOT_DURATIONS = {"rs_capacity_reserved"}  # the float settings that are not seconds


def check_systemd_listen(listen: str, source: str | None) -> None:
    """Refuse a ``systemd:`` endpoint that Twisted would not parse; the sockets themselves are not looked at."""
    kind, positional, keywords = split_endpoint(listen)
    where = label("purge.listen", source)
    example = "systemd:domain=INET:index=0 or systemd:domain=INET:name=purge"
    if positional or not set(keywords) <= {"domain", "index", "name"} or "domain" not in keywords:
        raise ConfigError(f"{where}: {listen!r} is not a systemd endpoint; write e.g. {example}")
    if keywords["domain"] not in ("INET", "INET6", "UNIX"):
        raise ConfigError(f"{where}: {listen!r}: domain= is INET, INET6 or UNIX")
    if ("index" in keywords) == ("name" in keywords):
        raise ConfigError(f"{where}: {listen!r}: give index= or name=, one of them; e.g. {example}")
    if "index" in keywords and not keywords["index"].isdigit():
        raise ConfigError(f"{where}: {listen!r}: index= is a number, e.g. 0")


def _is_systemd(listen: str) -> bool:
    return listen.partition(":")[0].strip().lower() == "systemd"


def resolve_here(path: str | None) -> Settings:
    """:func:`resolve` for a command run by hand: a ``systemd:`` purge endpoint is checked for its form only."""
    listen = None
    if path is not None:
        config = _load_quietly(path)
        purge = config.purge if config is not None else None
        if purge is not None and _is_systemd(purge.listen):
            check_systemd_listen(purge.listen, path)
            listen = purge.listen
    if listen is None:
        return resolve(path)
    settings = resolve(path, listen=PLACEHOLDER_LISTEN)
    assert settings.purge is not None
    return replace(settings, purge=replace(settings.purge, listen=listen), listen_option=None)


def _load_quietly(path: str) -> Config | None:
    try:
        return load(path)
    except ConfigError:
        return None  # resolve() reports it


def errors_in(path: str) -> list[str]:
    """Every configuration error in the file at *path* that can be found at once, in the order found."""
    try:
        data, _ = read_yaml_file(path, ConfigError)
    except ConfigError as e:
        return [str(e)]
    errors: list[str] = []
    pruner = Pruner(data, path, errors)
    config = pruner.until_clean(lambda d: build(Config, d, "", path))
    if config is not None:
        if config.purge is not None:
            pruner.until_clean(lambda d: _check_purge(build(Config, d, "", path).purge, path))
        if config.eg_config is not None:
            pruner.until_clean(lambda d: check_recache(build(Config, d, "", path), path))
        pruner.until_clean(lambda d: resolve_logging(build(Config, d, "", path).logging, path))
    try:  # the daemon's own reading, which also finds what no piece shows alone
        resolve_here(path)
    except ConfigError as e:
        if not errors or not pruner.gave_up and str(e) not in errors:
            errors.append(str(e))
    return list(dict.fromkeys(errors))


def _check_purge(purge: PurgeConfig | None, path: str) -> None:
    if purge is None:
        return
    if _is_systemd(purge.listen):
        check_systemd_listen(purge.listen, path)
        purge = replace(purge, listen=PLACEHOLDER_LISTEN)
    check_purge(purge, path)


_KEY_PATH = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+|\[\d+\])*")
_STEP = re.compile(r"[^.\[\]]+|\[\d+\]")


class Pruner:
    """Runs a check until it passes, taking out of the data each setting an error names (defaults apply).

    A message names its setting after the file's path (``file: purge.roots[1]: …``). A list item
    taken out shifts the items after it, so later messages are given back their indices in the file.
    A setting the file does not have (``metrics.listen`` is required when enabled) takes out the
    nearest section that it has. Where nothing can be taken out (``daemon_id`` missing), or the
    error is about a list it emptied (no roots left), it gives up on that check.
    """

    def __init__(self, data: dict[str, Any], source: str, errors: list[str]) -> None:
        self.data = copy.deepcopy(data)
        self.source = source
        self.errors = errors
        self.gave_up = False
        self._removed: dict[tuple[str, ...], list[int]] = {}  # a list's path in the file -> items taken out
        self._emptied: set[tuple[str, ...]] = set()  # lists with every item taken out

    def until_clean(self, check: Callable[[dict[str, Any]], T]) -> T | None:
        for _ in range(MAX_ERRORS):
            try:
                return check(self.data)
            except ConfigError as e:
                message, steps = self._in_file(str(e))
                if steps is not None and tuple(steps) in self._emptied:
                    self.gave_up = True
                    return None
                self.errors.append(message)
                if steps is None or not any(self._take_out(steps[:n]) for n in range(len(steps), 0, -1)):
                    self.gave_up = True
                    return None
        self.gave_up = True
        return None

    def _in_file(self, message: str) -> tuple[str, list[str] | None]:
        """*message* with its key path as the file has it, and that path's steps (``None``: none found)."""
        prefix = f"{self.source}: "
        match = _KEY_PATH.match(message, len(prefix)) if message.startswith(prefix) else None
        if match is None:
            return message, None
        steps = _STEP.findall(match.group())
        where: list[str] = []
        for i, step in enumerate(steps):
            if step.startswith("["):
                index = int(step[1:-1])
                for gone in sorted(self._removed.get(tuple(where), [])):
                    index += gone <= index
                steps[i] = f"[{index}]"
            where.append(steps[i])
        path = "".join(s if s.startswith("[") or i == 0 else f".{s}" for i, s in enumerate(steps))
        return prefix + path + message[match.end():], steps

    def _take_out(self, steps: list[str]) -> bool:
        """Remove the setting at *steps* (file indices) from the data; whether there was one to remove."""
        node: Any = self.data
        where: list[str] = []
        for depth, step in enumerate(steps):
            last = depth == len(steps) - 1
            if step.startswith("["):
                gone = sorted(self._removed.get(tuple(where), []))
                index = int(step[1:-1])
                current = index - sum(1 for g in gone if g < index)
                if not isinstance(node, list) or not 0 <= current < len(node) or index in gone:
                    return False
                if last or not isinstance(node[current], (dict, list)):
                    if len(node) == 1:  # what an empty list is refused for is no error of the file's
                        self._emptied.add(tuple(where))
                    del node[current]
                    self._removed.setdefault(tuple(where), []).append(index)
                    return True
                node = node[current]
            else:
                if not isinstance(node, dict) or step not in node:
                    return False
                if last:
                    del node[step]
                    return True
                node = node[step]
            where.append(step)
        return False


# --- what would run ------------------------------------------------------------------------------


def render(settings: Settings) -> str:
    """*settings* as YAML: every value resolved, defaults included, durations in Go syntax, secrets hidden."""
    shown: dict[str, Any] = {}
    for name in ("purge", "recache", "logging", "metrics"):
        value = getattr(settings, name, None)
        shown[name] = None if value is None else _plain(value, name)
    if settings.recache is not None:  # the hosts are the EG config's; their count is what a reader checks first
        shown["recache"]["edge"]["hosts_count"] = len(settings.recache.edge.hosts)
    return yaml.safe_dump(shown, sort_keys=False, default_flow_style=None, width=120, allow_unicode=True)


def _plain(value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.name == "warnings":
                continue
            if f.name in SECRETS:
                out[f.name] = "(set, hidden)" if item else ""
            else:
                out[f.name] = _plain(item, f.name)
        return out
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if name in NOT_DURATIONS else format_duration(value)
    if isinstance(value, (frozenset, set)):
        return sorted(_plain(v, name) for v in value)
    if isinstance(value, (tuple, list)):
        return [_plain(v, name) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, name) for k, v in value.items()}
    return str(value)
