"""Latency samples for the benchmarks: a prober thread, thread-safe collection, percentiles, outcome counts."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
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


class Prober(threading.Thread):
    """Calls *probe* every *every* seconds; samples go to ``current``, which the main thread swaps per phase.

    *probe* returns the outcome; a ``TimeoutError`` counts as *timeout* seconds, other I/O errors
    as no latency at all.
    """

    def __init__(self, probe: Callable[[], str], every: float, timeout: float) -> None:
        super().__init__(daemon=True)
        self.probe, self.every, self.timeout = probe, every, timeout
        self.current = Samples()
        self.stop_event = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            samples = self.current
            started = time.perf_counter()
            try:
                outcome = self.probe()
                samples.add(outcome, time.perf_counter() - started)
            except TimeoutError:
                samples.add("timeout", self.timeout)
            except (OSError, http.client.HTTPException) as e:
                samples.add(f"error {type(e).__name__}", None)
            next_at = max(next_at + self.every, time.monotonic())
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))


def purge_probe(port: int, line: bytes, timeout: float) -> str:
    """One purge as the PHP client makes it: connect, send *line*, read the reply line, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(line)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(512)
            if not chunk:
                break
            reply += chunk
    return "ok" if reply == b"Purge: Success\n" else f"reply {reply[:40]!r}"
