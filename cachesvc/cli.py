"""The ``cachesvc`` command: purge, check a config, and ask a running daemon how it is doing.

::

    cachesvc purge [--soft|--hard] TARGET...      one line per target over the purge protocol
    cachesvc check-config FILE                    every error at once, or what would run (like nginx -t)
    cachesvc status                               the purge half and the recache half, as tables
    cachesvc queue [HOST]                         depth per priority, due now, oldest due entry's wait
    cachesvc dead-letters list [HOST] | requeue (HOST | --all)

The daemon is found through its config (``--config FILE``; else ``$CACHESVC_CONFIG``; else
``/etc/cachesvc.yaml`` when it exists; else the defaults): the purge endpoint, the metrics
endpoint, the API and its key (``internal.auth_key`` of the EG config ``eg_config`` names).
Exit status: 0 success, 1 a failure (a purge not answered ``Purge: Success``, the daemon not
reachable or answering an error), 2 a usage error, 78 (EX_CONFIG) a configuration error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from cachesvc import __version__
from cachesvc.cli_config import errors_in, render, resolve_here
from cachesvc.cli_net import (
    Address,
    Failed,
    Http,
    NoAddress,
    Samples,
    client_address,
    from_socket_unit,
    parse_address,
    scrape,
)
from cachesvc.cli_recache import (
    dead_letter_table,
    dead_letters,
    find_host,
    host_list,
    purge_status_rows,
    queue_rows,
    queue_table,
    recache_status,
    requeue,
    table,
    trash_slots,
)
from cachesvc.config import EX_CONFIG, ConfigError, Settings, load
from cachesvc.purge.config import PurgeConfig
from cachesvc.recache.edgeconfig import Host
from cachesvc.recache.settings import RecacheSettings

DEFAULT_CONFIG = "/etc/cachesvc.yaml"
EX_FAILURE, EX_USAGE = 1, 2
SUCCESS = b"Purge: Success"
MODES = ("soft:", "hard:")
CENSUS_WAITS = 20  # tenths of a second status waits for a first count of the trash


class UsageError(Exception):
    """Arguments that cannot work (exit status 2)."""


def config_path(given: str | None) -> str | None:
    """``--config``, else ``$CACHESVC_CONFIG``, else /etc/cachesvc.yaml when it exists, else ``None`` (defaults)."""
    if given:
        return given
    if os.environ.get("CACHESVC_CONFIG"):
        return os.environ["CACHESVC_CONFIG"]
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


# --- purge ---------------------------------------------------------------------------------------


def purge_lines(targets: Sequence[str], mode: str | None) -> list[bytes]:
    """The request lines for *targets*; ``--soft``/``--hard`` prefix each. :class:`UsageError` for a bad target."""
    lines = []
    for target in targets:
        if not target or "\n" in target or "\r" in target or "\0" in target:
            raise UsageError(f"{target!r} is not a purge target: one line, not empty")
        if mode is not None:
            if target.startswith(MODES):
                raise UsageError(f"{target!r} names its own mode; leave out --{mode} or the {target[:5]} prefix")
            target = f"{mode}:{target}"
        lines.append(target.encode())
    return lines


def purge_address(listen: str, endpoint: str | None) -> Address:
    if endpoint:
        return parse_address(endpoint)
    if listen.partition(":")[0].strip().lower() == "systemd":
        found = from_socket_unit()
        if found is None:
            raise NoAddress(f"purge.listen is {listen!r} (socket activation) and systemctl does not say where "
                            "cachesvc.socket listens; pass --endpoint HOST:PORT or a socket path")
        return found
    return client_address(listen, "purge.listen")


def run_purge(lines: Sequence[bytes], address: Address, timeout: float, out: TextIO) -> int:
    """Send each line and read its reply before the next; print each outcome. 0 only when all succeeded."""
    ok = True
    with address.connect(timeout) as sock:
        reader = sock.makefile("rb")
        for line in lines:
            try:
                sock.sendall(line + b"\n")
                reply = reader.readline(4096).rstrip(b"\r\n")
            except OSError as e:
                raise Failed(f"purge {line.decode(errors='replace')!r}: {e.strerror or e} (from {address})") from None
            if not reply:
                raise Failed(f"purge {line.decode(errors='replace')!r}: {address} closed the connection unanswered")
            ok = ok and reply == SUCCESS
            print(f"{reply.decode(errors='replace')}\t{line.decode(errors='replace')}", file=out)
    return 0 if ok else EX_FAILURE


def cmd_purge(args: argparse.Namespace, out: TextIO) -> int:
    targets = list(args.targets)
    if targets == ["-"]:
        targets = [t for t in (line.rstrip("\n") for line in sys.stdin) if t]
    if not targets:
        raise UsageError("no targets; give paths, URLs, URL prefixes ending in *, or tag:<scope> <tags>")
    lines = purge_lines(targets, args.mode)
    path = config_path(args.config)
    listen = PurgeConfig().listen
    if not args.endpoint:
        config = load(path)  # only where it listens: a purge needs no more of the file
        listen = (config.purge or PurgeConfig()).listen
    return run_purge(lines, purge_address(listen, args.endpoint), args.timeout, out)


# --- check-config --------------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    errors = errors_in(args.file)
    if errors:
        for message in errors:
            print(message, file=err)
        count = f"{len(errors)} error{'s' if len(errors) != 1 else ''}"
        print(f"cachesvc: configuration file {args.file} test failed ({count})", file=err)
        return EX_CONFIG
    settings = resolve_here(args.file)
    print(f"# {args.file}, resolved: every setting that applies, defaults included", file=out)
    print(render(settings), file=out, end="")
    for warning in settings.warnings:
        print(f"warning: {warning}", file=err)
    print(f"cachesvc: configuration file {args.file} test is successful", file=err)
    return 0


# --- status, queue, dead letters -----------------------------------------------------------------


def api_client(settings: Settings, override: str | None, timeout: float) -> tuple[Http, RecacheSettings]:
    recache = settings.recache
    if recache is None:
        raise ConfigError(f"{settings.source or 'the defaults'}: no recache half (eg_config) is configured")
    if not override and not recache.api_enabled:
        raise ConfigError(f"{settings.source}: http_api.enabled is false; the command reads the daemon through its API")
    address = parse_address(override) if override else client_address(recache.api_listen, "http_api.listen")
    return Http(address, timeout, {"X-Internal-Auth": recache.edge.auth_key}), recache


def chosen_hosts(recache: RecacheSettings, host: str | None) -> list[Host]:
    if host is None:
        return list(recache.edge.hosts)
    found = find_host(recache.edge, host)
    if found is None:
        raise UsageError(f"no host {host!r} in {recache.edge.path}; hosts: {host_list(recache.edge)}")
    return [found]


def purge_samples(address: Address, path: str, timeout: float) -> Samples:
    """A scrape with the trash's files and bytes: the first scrape of a daemon only starts their count."""
    samples = scrape(address, path, timeout)
    for _ in range(CENSUS_WAITS):
        if "cachesvc_purge_trash_backlog_directories" not in samples or "cachesvc_purge_trash_backlog_files" in samples:
            break
        time.sleep(0.1)
        samples = scrape(address, path, timeout)
    return samples


def cmd_status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    settings = resolve_here(config_path(args.config))
    failed, report = False, {}
    if settings.purge is not None:
        p = settings.purge
        rows: list[list[object]] = [["FIGURE", "VALUE"], ["listen", p.listen], ["roots", ", ".join(p.roots)],
                                    ["trash", p.trash_dir]]
        samples = None
        if settings.metrics is not None:  # first: the port probe below would count as a connection
            try:
                samples = purge_samples(client_address(settings.metrics.listen, "metrics.listen"),
                                        settings.metrics.path, args.timeout)
            except (Failed, NoAddress) as e:
                failed = True
                rows.append(["metrics", f"not reachable: {e}"])
        try:
            sock = purge_address(p.listen, args.endpoint).connect(args.timeout)
            sock.close()
            rows.append(["purge port", "accepting connections"])
        except (Failed, NoAddress) as e:
            failed = True
            rows.append(["purge port", f"not reachable: {e}"])
        rows += purge_status_rows(samples) if samples else [["trash backlog", trash_slots(p.trash_dir)]]
        report["purge"] = {str(r[0]): r[1] for r in rows[1:]}
        if not args.json:
            print("purge\n" + table(rows, "  "), file=out)
    if settings.recache is not None:
        try:
            api, _ = api_client(settings, args.api, args.timeout)
            status = api.json("GET", "/status")
            api.close()
            report["recache"] = status
            if not args.json:
                print(("\n" if settings.purge else "") + "recache\n" + recache_status(status), file=out)
        except (Failed, NoAddress, ConfigError) as e:
            failed = True
            report["recache"] = {"error": str(e)}
            print(f"recache: {e}", file=err)
    if args.json:
        print(json.dumps(report, indent=2), file=out)
    return EX_FAILURE if failed else 0


def cmd_queue(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    api, recache = api_client(resolve_here(config_path(args.config)), args.api, args.timeout)
    hosts = chosen_hosts(recache, args.host)
    try:
        rows = queue_rows(api, api.json("GET", "/status"), hosts)
    finally:
        api.close()
    print(json.dumps(rows, indent=2) if args.json else queue_table(rows), file=out)
    return 0


def cmd_dead_letters(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    api, recache = api_client(resolve_here(config_path(args.config)), args.api, args.timeout)
    try:
        if args.action == "list":
            items = dead_letters(api, chosen_hosts(recache, args.host), args.limit)
            if args.json:
                print(json.dumps(items, indent=2), file=out)
            else:
                print(dead_letter_table(items) if items else "no dead-lettered entries", file=out)
            return 0
        if (args.host is None) == (not args.all):
            raise UsageError("requeue needs a HOST (id or domain) or --all")
        for host in chosen_hosts(recache, None if args.all else args.host):
            print(f"host {host.id}: {requeue(api, host):,} entries requeued", file=out)
        return 0
    finally:
        api.close()


# --- the parser ----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, metavar="FILE",
                        help=f"the daemon's config file (default: $CACHESVC_CONFIG, else {DEFAULT_CONFIG} if present)")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                        help="for each connection and answer (default 60 for purge, 10 otherwise)")
    top = argparse.ArgumentParser(prog="cachesvc", parents=[common],
                                  description="Purge caches and look at a running cachesvc daemon.",
                                  epilog="Exit status: 0 success, 1 failure, 2 usage error, 78 configuration error. "
                                         "More: the README's 'The cachesvc command'.")
    top.add_argument("--version", action="version", version=f"cachesvc {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("purge", parents=[common], help="purge paths, URLs, prefixes or tags",
                       description="Send each TARGET as one line of the purge protocol; print each reply. "
                                   "TARGET: a path below a cache root, a URL, a URL ending in * (a prefix), "
                                   "'tag:<scope> <tag>[,<tag>...]', each optionally after soft: or hard:; "
                                   "'-' reads targets from standard input, one a line.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--soft", dest="mode", action="store_const", const="soft", help="mark entries expired")
    mode.add_argument("--hard", dest="mode", action="store_const", const="hard", help="delete entries")
    p.add_argument("--endpoint", metavar="ADDRESS", help="HOST:PORT, PORT or a socket path (default: purge.listen)")
    p.add_argument("targets", nargs="*", metavar="TARGET")

    c = sub.add_parser("check-config", help="check a config file and print what would run",
                       description="Check both halves of FILE (and the EG config it names); print every error, "
                                   "or the resolved settings with their defaults. Exit 0, or 78 on an error.")
    c.add_argument("file", metavar="FILE")

    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--api", metavar="ADDRESS", help="the API's HOST:PORT or socket path (default: http_api.listen)")
    api.add_argument("--json", action="store_true", help="print the figures as JSON")
    s = sub.add_parser("status", parents=[common, api], help="the purge and recache halves at a glance")
    s.add_argument("--endpoint", metavar="ADDRESS", help="the purge port's address (default: purge.listen)")
    q = sub.add_parser("queue", parents=[common, api], help="queue depth per priority, due now, oldest due")
    q.add_argument("host", nargs="?", metavar="HOST", help="a host id or domain of the EG config (default: all)")
    d = sub.add_parser("dead-letters", parents=[common, api], help="list or requeue dead-lettered entries")
    d.add_argument("action", choices=["list", "requeue"])
    d.add_argument("host", nargs="?", metavar="HOST", help="a host id or domain of the EG config")
    d.add_argument("--all", action="store_true", help="requeue: every host's")
    d.add_argument("--limit", type=int, default=1000, help="list: at most this many entries (default 1000)")
    return top


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    top = parser()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = top.parse_args(argv)
    except SystemExit as e:  # --help, --version: 0; a usage error: 2
        return int(e.code or 0) if not isinstance(e.code, str) else EX_USAGE
    args.config = getattr(args, "config", None)
    args.timeout = getattr(args, "timeout", None) or (60.0 if args.command == "purge" else 10.0)
    commands: dict[str, Callable[[], int]] = {
        "purge": lambda: cmd_purge(args, out),
        "check-config": lambda: cmd_check_config(args, out, err),
        "status": lambda: cmd_status(args, out, err),
        "queue": lambda: cmd_queue(args, out, err),
        "dead-letters": lambda: cmd_dead_letters(args, out, err),
    }
    try:
        return commands[args.command]()
    except ConfigError as e:
        print(f"cachesvc: {e}", file=err)
        return EX_CONFIG
    except (UsageError, NoAddress) as e:
        print(f"cachesvc {args.command}: {e}", file=err)
        return EX_USAGE
    except Failed as e:
        print(f"cachesvc {args.command}: {e}", file=err)
        return EX_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # python -m cachesvc.cli
    sys.exit(main())
