"""What the scheduler shares with the API: pause flag, last tick, start time, in-memory work."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SchedulerState:
    started_at: float
    max_size: int
    paused: bool = False
    last_tick: float | None = None
    in_flight: dict[int, int] = field(default_factory=dict)  # host id -> entries held by this daemon

    @property
    def size(self) -> int:
        return sum(self.in_flight.values())
