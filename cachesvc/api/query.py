"""Reading a request: query arguments, the JSON body, host and dimension lookups, offset pages.

The messages and status codes are the Go daemon's, so clients that match on them keep working.
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from cachesvc.api.http import ApiError
from cachesvc.recache.edgeconfig import EdgeConfig, Host
from cachesvc.recache.gojson import GoJSONError, Struct, decode

DEFAULT_LIMIT = 25
MAX_LIMIT = 100

def parse_uint(text: str) -> int | None:
    """Go's ``strconv.ParseUint(text, 10, 64)``: the value, or ``None`` where Go returns an error.

    ASCII digits only: no sign, no spaces, no ``_``, no Arabic-Indic or other Unicode digits (all
    of which Python's ``int()`` accepts); below ``2**64``; leading zeros are fine.
    """
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > 20:  # beyond 64 bits whatever the digits (and before int() meets a huge string)
        return None
    value = int(digits)
    return value if value < 2**64 else None


def atoi(text: str) -> int | None:
    """Go's ``strconv.Atoi`` on 64 bits: an optional sign, then :func:`parse_uint`'s digits, within int64."""
    sign = text[:1] if text[:1] in ("+", "-") else ""
    magnitude = parse_uint(text[len(sign) :])
    if magnitude is None:
        return None
    value = -magnitude if sign == "-" else magnitude
    return value if -(2**63) <= value < 2**63 else None


def arg(request: Request, name: str) -> str | None:
    """The first value of query argument *name*, or ``None``."""
    values = request.args.get(name.encode()) if request.args else None
    return values[0].decode("utf-8", "replace") if values else None


def csv(request: Request, name: str) -> list[str] | None:
    """A comma-separated query argument, each part stripped; ``None`` when absent or empty."""
    raw = arg(request, name)
    if raw is None or raw == "":
        return None
    return [part.strip() for part in raw.split(",")]


def limit(request: Request) -> int:
    raw = arg(request, "limit")
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    value = atoi(raw)
    if value is None:
        raise ApiError(400, "limit must be a valid integer")
    if not 1 <= value <= MAX_LIMIT:
        raise ApiError(400, f"limit must be between 1 and {MAX_LIMIT}")
    return value


def offset(request: Request) -> int:
    """The decimal offset ``cursor`` of offset-paged listings (what Atoi refuses, or negative, is 0, as in Go)."""
    return max(0, atoi(arg(request, "cursor") or "0") or 0)


def page(items: list[dict[str, Any]], start: int, size: int, total: int | None = None) -> dict[str, Any]:
    """The page envelope of an offset listing: *items* starting at *start*, of *total* (default: len)."""
    if total is None:
        total, items = len(items), items[start : start + size]
    more = start + size < total
    return {"items": items, "cursor": str(start + size) if more else "0", "has_more": more}


def non_negative(request: Request, name: str) -> int:
    raw = arg(request, name)
    if raw is None or raw == "":
        return 0
    value = atoi(raw)
    if value is None:
        raise ApiError(400, f"{name} must be a valid integer")
    if value < 0:
        raise ApiError(400, f"{name} must be >= 0")
    return value


def content(request: Request) -> bytes:
    """The request body as received (empty when there is none)."""
    return request.content.read() if request.content is not None else b""


def body(data: bytes, spec: Struct) -> dict[str, Any]:
    """Decode a JSON body as the Go struct *spec* would; 400 with Go's message when it cannot."""
    try:
        return decode(data, spec)
    except GoJSONError as e:
        raise ApiError(400, f"invalid json: {e}") from None


def host(edge: EdgeConfig, host_id: int, status: int = 400) -> Host:
    found = edge.host(host_id)
    if found is None:
        raise ApiError(status, f"host_id {host_id} not found")
    return found


def query_host(edge: EdgeConfig, request: Request) -> Host:
    """The ``host_id`` query argument of the listings: required, numeric, positive, configured (else 404)."""
    raw = arg(request, "host_id")
    if raw is None or raw == "":
        raise ApiError(400, "host_id is required")
    host_id = atoi(raw)
    if host_id is None:
        raise ApiError(400, "host_id must be a valid integer")
    if host_id <= 0:
        raise ApiError(400, "host_id is required")
    return host(edge, host_id, status=404)


def dimensions(found: Host, requested: list[int] | None) -> list[int]:
    """The dimensions a write applies to: those requested (each configured), or every one that renders."""
    allowed = found.recache_dimension_ids
    if not requested:
        return allowed
    for dim in requested:
        if dim not in allowed:
            raise ApiError(400, f"dimension_id {dim} not configured for host '{found.domain}'")
    return list(requested)


def dimension_names(found: Host) -> dict[int, str]:
    return {d.id: d.name for d in found.dimensions}
