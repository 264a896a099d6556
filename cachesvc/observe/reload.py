"""SIGHUP re-reads the config file and applies what changes without a restart; SIGUSR1 rotates the log files.

A reload is all or nothing. The file is read and checked as at start-up (the command line's
``--purge-listen`` and ``--cache-root`` still apply); an invalid file, or a change that needs a
restart, is logged with what to do, and the running configuration stays whole. What changes in
place:

- the purge half: what :meth:`PurgeService.reconfigure` applies (zones, modes, warming, limits;
  the port, the roots, the trash, the tag index and the cluster need a restart);
- the recache half: ``scheduler.tick_interval`` and ``normal_check_interval``,
  ``internal_queue.max_size``, ``max_retries`` and ``retry_base_delay``, and
  ``recache.shutdown_grace`` (the scheduler reads them on every use); everything else (Redis, the
  API, the EG config, the capacity reserve /status reports, the lease, the timeouts) needs a restart;
- the log levels (``logging.level``, ``console.level``, ``file.level``); other ``logging:``
  fields, ``metrics:`` and adding or removing a half need a restart.

Signals are turned into reactor calls (``callFromThread``), never handled mid-way through other code.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from cachesvc.config import ConfigError, Settings, resolve
from cachesvc.observe.logs import LogControl
from cachesvc.observe.sdnotify import Readiness
from cachesvc.purge.service import PurgeService
from cachesvc.recache.scheduler import Scheduler
from cachesvc.recache.settings import RecacheSettings
from cachesvc.recache.state import SchedulerState

RECACHE_KEYS = {
    "daemon_id": "daemon_id", "redis_addr": "redis.addr", "redis_password": "redis.password", "redis_db": "redis.db",
    "tick_interval": "scheduler.tick_interval", "normal_check_interval": "scheduler.normal_check_interval",
    "max_size": "internal_queue.max_size", "max_retries": "internal_queue.max_retries",
    "retry_base_delay": "internal_queue.retry_base_delay", "rs_capacity_reserved": "recache.rs_capacity_reserved",
    "timeout_per_url": "recache.timeout_per_url", "high_queue_limit": "recache.high_queue_limit",
    "lease": "recache.lease", "edge_gateways": "recache.edge_gateways", "gateway_cooldown": "recache.gateway_cooldown",
    "shutdown_grace": "recache.shutdown_grace", "api_enabled": "http_api.enabled", "api_listen": "http_api.listen",
    "request_timeout": "http_api.request_timeout", "scheduler_control_api": "http_api.scheduler_control_api",
    "max_body_size": "http_api.max_body_size", "max_connections": "http_api.max_connections",
    "metrics_enabled": "metrics.enabled", "metrics_listen": "metrics.listen", "metrics_path": "metrics.path",
    "metrics_namespace": "metrics.namespace", "edge": "eg_config",
}
"""Each field of :class:`RecacheSettings` by the config key it comes from."""

RECACHE_RELOADABLE = frozenset(
    {"tick_interval", "normal_check_interval", "max_size", "max_retries", "retry_base_delay", "shutdown_grace"}
)


def recache_changes(old: RecacheSettings, new: RecacheSettings) -> tuple[list[str], list[str]]:
    """The changed fields of the recache half: ``(applied in place, needing a restart)``, as config keys."""
    applied: list[str] = []
    restart: list[str] = []
    for f in fields(RecacheSettings):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if f.name == "edge":  # its warnings are no setting
            before, after = replace(before, warnings=()), replace(after, warnings=())
        if before != after:
            (applied if f.name in RECACHE_RELOADABLE else restart).append(RECACHE_KEYS.get(f.name, f.name))
    return applied, restart


def changed_fields(old: Any, new: Any, prefix: str) -> list[str]:
    """The top-level fields of two dataclass values that differ, as ``prefix.field``."""
    return [f"{prefix}.{f.name}" for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """What differs between *old* and *new* that only a restart applies (the purge half's own aside)."""
    needs = []
    if (old.purge is None) != (new.purge is None):
        needs.append("purge (the section was added or removed)")
    if (old.recache is None) != (new.recache is None):
        needs.append("eg_config (the recache half was added or removed)")
    elif old.recache is not None and new.recache is not None:
        needs += recache_changes(old.recache, new.recache)[1]
    if old.metrics != new.metrics and not any(n.startswith("metrics.") for n in needs):
        needs.append("metrics")
    if old.logging.outputs() != new.logging.outputs():
        needs.append("logging (outputs, formats, file path or rotation; only levels change in place)")
    return needs


class Reloader(Service):
    """Installs the SIGHUP and SIGUSR1 handlers while it runs; :meth:`reload` is SIGHUP's work."""

    log = Logger()
    name = "reload"

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        purge: PurgeService | None = None,
        scheduler: Scheduler | None = None,
        state: SchedulerState | None = None,
        logs: LogControl | None = None,
        readiness: Readiness | None = None,
        read: Callable[[str | None, str | None, tuple[str, ...]], Settings] = resolve,
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        self.purge = purge
        self.scheduler = scheduler
        self.state = state
        self.logs = logs
        self.readiness = readiness
        self._read = read
        self._previous: dict[int, Any] = {}

    # --- signals ---------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Install the handlers before any port listens (this is the tree's first service), so that a
        SIGHUP that arrives while the daemon starts is handled once the reactor runs instead of ending it."""
        Service.privilegedStartService(self)
        if threading.current_thread() is not threading.main_thread():
            self.log.warn("not in the main thread: SIGHUP and SIGUSR1 are not handled")
            return
        self._install(signal.SIGHUP, self.reload)
        if self.logs is not None:  # with no file to rotate too: a stray SIGUSR1 must not end the daemon
            self._install(signal.SIGUSR1, self.logs.rotate)

    def _install(self, signum: int, call: Callable[[], Any]) -> None:
        def handler(number: int, frame: Any) -> None:
            self.reactor.callFromThread(call)

        self._previous[signum] = signal.signal(signum, handler)

    def stopService(self) -> None:
        """Restore the handlers (this is the tree's last service to stop)."""
        Service.stopService(self)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    # --- the reload ------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config file and apply it, or log why not; whether it was applied."""
        if self.readiness is not None:
            self.readiness.reloading()
        try:
            return self._reload()
        except Exception:
            self.log.failure("SIGHUP: reloading failed; the running configuration stays")
            return False
        finally:
            if self.readiness is not None:
                self.readiness.reloaded(self.settings.summary())

    def _reload(self) -> bool:
        old = self.settings
        if old.source is None:
            self.log.warn("SIGHUP: started without a config file (--config or CACHESVC_CONFIG): nothing to re-read")
            return False
        try:
            new = self._read(old.source, old.listen_option, old.root_options)
        except ConfigError as e:
            self.log.error("SIGHUP: {source} not applied, the running configuration stays: {error}",
                           source=old.source, error=str(e))
            return False
        for warning in new.warnings:
            self.log.warn("{warning}", warning=warning)
        needs = restart_needed(old, new)
        if not needs and self.purge is not None and new.purge is not None and new.purge != old.purge:
            needs = self.purge.reconfigure(new.purge)  # applied, unless it names what needs a restart
        if needs:
            self.log.warn("SIGHUP: {source} not applied, the running configuration stays: {changes} "
                          "need{s} a restart (systemctl restart cachesvc)",
                          source=old.source, changes=", ".join(needs), s="s" if len(needs) == 1 else "")
            return False
        changes = changed_fields(old.purge, new.purge, "purge") if old.purge and new.purge else []
        if old.recache is not None and new.recache is not None:
            applied = recache_changes(old.recache, new.recache)[0]
            if applied:
                self._apply_recache(new.recache)
            changes += applied
        levels = old.logging != new.logging
        if levels:
            changes.append("logging levels")
        self.settings = new
        self.log.info("SIGHUP: re-read {source}: {changes}", source=old.source,
                      changes="applied " + ", ".join(changes) if changes else "no change")
        if levels and self.logs is not None:  # the line above shows at the old levels, this one at the new
            self.logs.set_levels(new.logging)
            self.log.info("log levels now: {levels}", levels=", ".join(
                f"{name} {output.level}" for name, output in (("console", new.logging.console),
                                                              ("file", new.logging.file)) if output is not None))
        return True

    def _apply_recache(self, settings: RecacheSettings) -> None:
        if self.scheduler is not None:
            self.scheduler.settings = settings
            self.scheduler.loop.interval = settings.tick_interval  # from the next tick on
        if self.state is not None:
            self.state.max_size = settings.max_size
