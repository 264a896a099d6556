"""Render Service registry (``service:render:*``): who can render, and how much room online traffic leaves."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

RS_HEALTHY_WITHIN = 3.0  # seconds: the RS registry TTL
_FRACTION = re.compile(r"\.(\d+)")


def parse_go_time(text: str) -> float:
    """RFC 3339 with up to nanoseconds (Go's ``time.Time`` JSON) to Unix seconds."""
    text = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text.strip())
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    return datetime.fromisoformat(text).timestamp()


def format_go_time(seconds: float | None) -> str:
    """RFC 3339 UTC at second precision; Go's zero time when never."""
    if seconds is None:
        return "0001-01-01T00:00:00Z"
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class RenderService:
    id: str
    capacity: int
    load: int
    last_seen: float

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.load)


def healthy_services(values: Sequence[bytes], now: float) -> list[RenderService]:
    """Decode registry values, keep those seen within 3 s of *now*, sorted by id (spec 1.4)."""
    services = []
    for raw in values:
        try:
            info: Any = json.loads(raw)
            service = RenderService(str(info["id"]), int(info.get("capacity", 0)), int(info.get("load", 0)),
                                    parse_go_time(str(info["last_seen"])))
        except (ValueError, KeyError, TypeError):
            continue
        if now - service.last_seen < RS_HEALTHY_WITHIN:
            services.append(service)
    return sorted(services, key=lambda s: s.id)


@dataclass(frozen=True)
class Capacity:
    total_free: int
    reserved: int
    available: int
    reservation: float

    @classmethod
    def of(cls, services: Sequence[RenderService], reservation: float) -> Capacity:
        total = sum(s.free for s in services)
        reserved = math.floor(total * reservation)  # Go: int(float64(total) * reserved), truncating
        return cls(total, reserved, max(0, total - reserved), reservation)


def capacity_line(services: Sequence[RenderService], reservation: float) -> int:
    """The most render load recache may bring the Render Services to: (1 - reservation) x capacity."""
    return math.floor((1 - reservation) * sum(s.capacity for s in services) + 1e-9)
