"""Latency samples for the benchmarks: thread-safe collection, nearest-rank percentiles, outcome counts."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Samples:
    latencies: list[float] = field(default_factory=list)  # seconds, answered calls only
    outcomes: Counter[str] = field(default_factory=Counter)  # "ok", "200", "503", "timeout", "error ..."
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, seconds: float | None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if seconds is not None:
                self.latencies.append(seconds)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile of *values* (seconds), in ms; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * p // 100)))
    return ordered[int(rank) - 1] * 1000


def mean_ms(samples: Samples) -> float:
    return sum(samples.latencies) / len(samples.latencies) * 1000 if samples.latencies else float("nan")


def outcomes(c: Counter[str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "none"
