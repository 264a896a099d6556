"""What ``cachesvc status``, ``queue`` and ``dead-letters`` show: read through the daemon's API and metrics.

Each function returns the text to print (or the data, for ``--json``); :class:`~cachesvc.cli_net.Failed`
when the daemon cannot be asked. Tables are plain columns, numbers right-aligned, for people and
for ``awk`` alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from cachesvc.cli_net import Http, Samples
from cachesvc.recache.edgeconfig import EdgeConfig, Host
from cachesvc.recache.keys import PRIORITIES

PAGE = 100  # the API's largest page


def table(rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """Rows (the first is the header) in aligned columns; numbers right-aligned."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(map(len, cells)))]
    numeric = [all(isinstance(r[i], (int, float)) for r in rows[1:] if i < len(r)) and len(rows) > 1
               for i in range(len(widths))]
    lines = []
    for row in cells:
        parts = [c.rjust(widths[i]) if numeric[i] else c.ljust(widths[i]) for i, c in enumerate(row)]
        lines.append(indent + "  ".join(parts).rstrip())
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def age(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h03m``, ``4d02h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(count: float) -> str:
    value, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def find_host(edge: EdgeConfig, text: str) -> Host | None:
    """A host of the EG config by id or by one of its domains."""
    for host in edge.hosts:
        if text == str(host.id) or text.lower() in (d.lower() for d in host.domains):
            return host
    return None


def host_list(edge: EdgeConfig) -> str:
    return ", ".join(f"{h.id} ({', '.join(h.domains)})" for h in edge.hosts) or "none"


# --- status --------------------------------------------------------------------------------------


def _flatten(prefix: str, value: Any, rows: list[list[object]]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, item, rows)
    else:
        rows.append([prefix, value if isinstance(value, (int, float, bool)) else str(value)])


def recache_status(status: dict[str, Any]) -> str:
    """``/status`` as two tables: the daemon's figures (section.field, value), then the queues per host."""
    rows: list[list[object]] = [["FIGURE", "VALUE"]]
    for section, value in status.items():
        if section != "queues":
            _flatten(section, value, rows)
    text = table(rows, "  ")
    queues = status.get("queues") or {}
    if queues:
        header: list[object] = ["HOST"]
        for p in PRIORITIES:
            header += [p.upper(), "DUE"]
        qrows: list[list[object]] = [[*header, "DEAD LETTERS"]]
        for host, counts in queues.items():
            row: list[object] = [host]
            for p in PRIORITIES:
                row += [counts.get(p, {}).get("total", 0), counts.get(p, {}).get("due_now", 0)]
            qrows.append([*row, counts.get("dead_letter", 0)])
        text += "\n\n" + table(qrows, "  ")
    return text


def _one(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get(name, {}).get(tuple(sorted(labels.items())))


def purge_status_rows(samples: Samples) -> list[list[object]]:
    """The purge half's figures from a scrape of the metrics endpoint."""
    rows: list[list[object]] = []
    dirs = _one(samples, "cachesvc_purge_trash_backlog_directories")
    files = _one(samples, "cachesvc_purge_trash_backlog_files")
    used = _one(samples, "cachesvc_purge_trash_backlog_bytes")
    if dirs is not None:
        counted = "" if files is None else f", {int(files):,} files, {size(used or 0)}"
        partial = " (at least: the count stopped at its bound)" if _one(
            samples, "cachesvc_purge_trash_census_complete") == 0 else ""
        rows.append(["trash backlog", f"{int(dirs):,} directories{counted}{partial}"])
    opened, most = _one(samples, "cachesvc_purge_connections"), _one(samples, "cachesvc_purge_connections_max")
    if opened is not None:
        rows.append(["connections", f"{int(opened):,} of {int(most or 0):,}"])
    requests = samples.get("cachesvc_purge_requests_total", {})
    if requests:
        by_outcome: dict[str, float] = {}
        for labels, count in requests.items():
            outcome = dict(labels).get("outcome", "")
            by_outcome[outcome] = by_outcome.get(outcome, 0) + count
        detail = ", ".join(f"{int(v):,} {k}" for k, v in sorted(by_outcome.items()))
        rows.append(["purges", f"{int(sum(by_outcome.values())):,} ({detail})"])
    for labels, entries in sorted(samples.get("cachesvc_purge_tag_index_entries", {}).items()):
        zone = dict(labels).get("zone", "")
        tags = _one(samples, "cachesvc_purge_tag_index_tags", zone=zone) or 0
        whole = _one(samples, "cachesvc_purge_tag_index_whole", zone=zone)
        state = "ready" if whole == 1 else "not whole yet (tag purges scan)"
        rows.append([f"tag index {zone}", f"{int(entries):,} entries, {int(tags):,} tags, {state}"])
    limit = _one(samples, "cachesvc_warm_concurrency_limit")
    if limit is not None:
        most = _one(samples, "cachesvc_warm_concurrency_max") or 0
        flying = _one(samples, "cachesvc_warm_in_flight_requests") or 0
        pending = _one(samples, "cachesvc_warm_pending_urls") or 0
        rows.append(["warm", f"limit {int(limit)} of {int(most)}, {int(flying):,} in flight, {int(pending):,} pending"])
    return rows


def trash_slots(trash_dir: str) -> str:
    """What the filesystem says of the trash: its slots (purged directories not yet deleted)."""
    try:
        count = len(os.listdir(trash_dir))
    except FileNotFoundError:
        return "0 directories (the trash does not exist yet)"
    except OSError as e:
        return f"cannot read {trash_dir} ({e.strerror}): run as the daemon's user, or enable metrics"
    return f"{count:,} directories (from the filesystem; enable metrics for files, bytes and the tag index)"


# --- queue and dead letters ---------------------------------------------------------------------


def queue_rows(
    api: Http, status: dict[str, Any], hosts: Sequence[Host], now: float | None = None
) -> list[dict[str, Any]]:
    """Per host and priority: entries, due now, and how long the oldest due entry has waited."""
    now = time.time() if now is None else now
    queues = status.get("queues") or {}
    found = []
    for host in hosts:
        counts = queues.get(str(host.id), {})
        for p in PRIORITIES:
            total, due = counts.get(p, {}).get("total", 0), counts.get(p, {}).get("due_now", 0)
            oldest = None
            if due:  # the queue listing is in due-time order: its first entry is the oldest due
                query = urlencode({"host_id": host.id, "priority": p, "limit": 1})
                items = api.json("GET", f"/internal/cache/queue?{query}")["data"]["items"]
                if items:
                    oldest = max(0.0, now - items[0]["scheduled_at"])
            found.append({"host_id": host.id, "domain": host.domains[0] if host.domains else "", "priority": p,
                          "total": total, "due_now": due, "oldest_due_seconds": oldest})
    return found


def queue_table(rows: list[dict[str, Any]]) -> str:
    out: list[list[object]] = [["HOST", "DOMAIN", "PRIORITY", "TOTAL", "DUE NOW", "OLDEST DUE"]]
    for r in rows:
        oldest = "-" if r["oldest_due_seconds"] is None else age(r["oldest_due_seconds"])
        out.append([r["host_id"], r["domain"], r["priority"], r["total"], r["due_now"], oldest])
    return table(out)


def dead_letters(api: Http, hosts: Sequence[Host], limit: int) -> list[dict[str, Any]]:
    """Up to *limit* dead-lettered entries of *hosts*, oldest failure first within each host."""
    found: list[dict[str, Any]] = []
    for host in hosts:
        cursor = "0"
        while len(found) < limit:
            query = urlencode({"host_id": host.id, "limit": min(PAGE, limit - len(found)), "cursor": cursor})
            data = api.json("GET", f"/internal/cache/deadletter?{query}")["data"]
            found += [{"host_id": host.id, **item} for item in data["items"]]
            if not data.get("has_more"):
                break
            cursor = data["cursor"]
    return found


def dead_letter_table(items: list[dict[str, Any]]) -> str:
    rows: list[list[object]] = [["HOST", "PRIORITY", "ATTEMPTS", "FAILED AT", "REASON", "DIMENSION", "URL"]]
    for i in items:
        when = datetime.fromtimestamp(i["failed_at"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if i["failed_at"] else "-"
        rows.append([i["host_id"], i["priority"], i["attempts"], when, i["reason"], i["dimension"], i["url"]])
    return table(rows)


def requeue(api: Http, host: Host) -> int:
    """Put *host*'s dead-lettered entries back in their queues; how many."""
    data = api.json("POST", "/internal/cache/deadletter/requeue", {"host_id": host.id})["data"]
    return int(data["entries_requeued"])
