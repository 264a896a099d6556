"""The parts of an EdgeComet Edge Gateway config the Cache Daemon uses.

Hosts (from ``hosts.include``: a file, a directory of ``*.yaml`` or a glob, relative to the EG
config, files sorted by name), their domains and dimensions (with the built-in ``bypass`` dimension,
id 0, injected as the EG does), ``internal.auth_key``, and ``render.cache.expired.stale_ttl``.
Everything else in the EG files belongs to the EG and is ignored, not validated. Each file is read
within the bounds of :func:`cachesvc.configfile.read_yaml_file` (1 MiB, alias expansion, nesting).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

from cachesvc.configfile import SHOWN_CHARS, read_yaml_file, secret_warning, segment, shown
from cachesvc.durations import parse_duration


class EdgeConfigError(Exception):
    """The EG config cannot be used; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Dimension:
    name: str
    id: int
    action: str  # "render", "block" or "bypass"


@dataclass(frozen=True)
class Host:
    id: int
    domains: tuple[str, ...]
    dimensions: tuple[Dimension, ...]  # in file order, bypass (id 0) included
    stale_ttl: float
    enabled: bool
    source: str

    @property
    def domain(self) -> str:
        """The primary domain, used in error messages."""
        return self.domains[0] if self.domains else ""

    @property
    def dimension_by_id(self) -> dict[int, Dimension]:
        return {d.id: d for d in self.dimensions}

    @property
    def dimension_by_name(self) -> dict[str, Dimension]:
        return {d.name: d for d in self.dimensions}

    @property
    def recache_dimension_ids(self) -> list[int]:
        """Every dimension whose action is not ``block``: what "all dimensions" means."""
        return sorted(d.id for d in self.dimensions if d.action != "block")


@dataclass(frozen=True)
class EdgeConfig:
    path: str
    auth_key: str
    hosts: tuple[Host, ...]  # file name order, then file order
    warnings: tuple[str, ...] = ()  # e.g. the auth key in a file every user can read

    def host(self, host_id: int) -> Host | None:
        for host in self.hosts:
            if host.id == host_id:
                return host
        return None


def load_edge_config(path: str) -> EdgeConfig:
    data, mode = read_yaml_file(path, EdgeConfigError, "EG config file")
    internal = _mapping(data.get("internal"), path, "internal")
    auth_key = internal.get("auth_key") or ""
    if not isinstance(auth_key, str) or not auth_key:
        raise EdgeConfigError(
            f"{path}: internal.auth_key in EG config is required for daemon API authentication; "
            "set it to the shared secret the Edge Gateways use"
        )
    exposed = secret_warning(path, mode, "internal.auth_key")
    global_stale = _stale_ttl(data, path, "render.cache.expired.stale_ttl") or 0.0
    global_dims = data.get("dimensions")
    hosts_section = data.get("hosts")
    host_entries: list[tuple[str, int, dict[str, Any]]] = []
    if isinstance(hosts_section, list):  # hosts written inline
        host_entries += [(path, i, h) for i, h in enumerate(hosts_section)]
    else:
        hosts_section = _mapping(hosts_section, path, "hosts")
        include = hosts_section.get("include")
        if not include or not isinstance(include, str):
            raise EdgeConfigError(f"{path}: hosts.include is required: a host file, a directory of *.yaml, or a glob")
        for file in _host_files(path, include):
            entries = _read_yaml(file).get("hosts") or []
            if not isinstance(entries, list):
                raise EdgeConfigError(f"{file}: hosts must be a list of host entries")
            host_entries += [(file, i, h) for i, h in enumerate(entries)]
    hosts: list[Host] = []
    seen: dict[int, str] = {}
    for file, index, entry in host_entries:
        host = _host(entry, file, f"hosts[{index}]", global_dims, global_stale)
        if host.id in seen:
            raise EdgeConfigError(
                f"{file}: hosts[{index}].id {host.id} is already used by a host in {seen[host.id]}; "
                "host ids must be unique"
            )
        seen[host.id] = file
        hosts.append(host)
    return EdgeConfig(path, auth_key, tuple(hosts), (exposed,) if exposed else ())


def _read_yaml(path: str) -> dict[str, Any]:
    return read_yaml_file(path, EdgeConfigError, "EG config file")[0]


def _mapping(value: Any, path: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EdgeConfigError(f"{path}: {key} must be a mapping")
    return value


def _host_files(eg_path: str, include: str) -> list[str]:
    pattern = include if os.path.isabs(include) else os.path.join(os.path.dirname(os.path.abspath(eg_path)), include)
    files = glob.glob(os.path.join(pattern, "*.yaml")) if os.path.isdir(pattern) else glob.glob(pattern)
    files = sorted(files, key=os.path.basename)
    if not files:
        raise EdgeConfigError(
            f"{eg_path}: hosts.include {shown(include)} matches no host files; "
            "check the path (relative to the EG config)"
        )
    return files


def _stale_ttl(section: dict[str, Any], path: str, where: str) -> float | None:
    value: Any = section
    for key in ("render", "cache", "expired", "stale_ttl"):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    if value is None or value == "":
        return None
    text = str(value) if isinstance(value, (int, float)) else value
    if not isinstance(text, str) or len(text) > SHOWN_CHARS:  # parse_duration's message repeats it whole
        raise EdgeConfigError(f"{path}: {where}: {shown(value)} is not a duration; write e.g. 1h or 30m")
    try:
        return parse_duration(text)
    except ValueError as e:
        raise EdgeConfigError(f"{path}: {where}: {e}") from None


def _host(entry: Any, file: str, where: str, global_dims: Any, global_stale: float) -> Host:
    if not isinstance(entry, dict):
        raise EdgeConfigError(f"{file}: {where} must be a mapping")
    host_id = entry.get("id")
    if isinstance(host_id, bool) or not isinstance(host_id, int) or host_id <= 0:
        raise EdgeConfigError(f"{file}: {where}.id must be a positive integer, got {shown(host_id)}")
    domain = entry.get("domain")
    domains = [domain] if isinstance(domain, str) else domain if isinstance(domain, list) else []
    domains = [str(d).rstrip(".") for d in domains if d]
    if not domains:
        raise EdgeConfigError(f"{file}: {where}.domain is required (a name or a list of names)")
    dims_source = entry.get("dimensions") if entry.get("dimensions") else global_dims
    dimensions = _dimensions(dims_source or {}, file, f"{where}.dimensions")
    stale = _stale_ttl(entry, file, f"{where}.render.cache.expired.stale_ttl")
    enabled = entry.get("enabled", True)
    stale_ttl = global_stale if stale is None else stale
    return Host(host_id, tuple(domains), dimensions, stale_ttl, enabled is not False, file)


def _dimensions(section: Any, file: str, where: str) -> tuple[Dimension, ...]:
    if not isinstance(section, dict):
        raise EdgeConfigError(f"{file}: {where} must be a mapping of dimension name to settings")
    dims: list[Dimension] = []
    ids: dict[int, str] = {}
    for name, spec in section.items():
        label = f"{where}.{segment(name)}"
        spec = spec or {}
        if not isinstance(spec, dict):
            raise EdgeConfigError(f"{file}: {label} must be a mapping of settings (id, action, match_ua)")
        dim_id = spec.get("id", 0)
        if isinstance(dim_id, bool) or not isinstance(dim_id, int) or dim_id < 0:
            raise EdgeConfigError(f"{file}: {label}.id must be a whole number >= 0, got {shown(dim_id)}")
        action = spec.get("action") or "render"
        if name == "bypass":
            if dim_id != 0:
                raise EdgeConfigError(f"{file}: {label}.id must be 0: id 0 is reserved for the bypass dimension")
            action = "bypass"
        elif dim_id == 0:
            raise EdgeConfigError(f"{file}: {label}.id 0 is reserved for the bypass dimension; give it a positive id")
        elif action == "bypass":
            raise EdgeConfigError(f"{file}: {label}.action bypass is only allowed for the dimension named bypass")
        if action == "block" and not spec.get("match_ua"):
            raise EdgeConfigError(f"{file}: {label}: a block dimension needs match_ua patterns")
        if action not in ("render", "block", "bypass"):
            raise EdgeConfigError(f"{file}: {label}.action {shown(action)} is not one of render, block, bypass")
        if dim_id in ids:
            raise EdgeConfigError(
                f"{file}: {label}.id {dim_id} is already used by dimension {shown(ids[dim_id])}; "
                "dimension ids must be unique per host"
            )
        ids[dim_id] = name
        dims.append(Dimension(str(name), dim_id, action))
    if 0 not in ids:
        dims.append(Dimension("bypass", 0, "bypass"))
    return tuple(dims)
