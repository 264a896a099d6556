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
    budget: int = 0  # what the capacity line allowed at the last claim, for all daemons together
    capacity_line: int = 0  # (1 - rs_capacity_reserved) x total render capacity

    @property
    def size(self) -> int:
        return sum(self.in_flight.values())
