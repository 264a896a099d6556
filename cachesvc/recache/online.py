"""The online load the render budget leaves room for: an estimate carried from claim to claim.

A registry snapshot's load is online traffic plus the recache requests being rendered, and no
snapshot says which claims it shows: a request claimed before it may not have reached its gateway
yet (on a busy machine that takes longer than the next registry write), and one answered since may
still be rendering in it. So a snapshot only bounds online traffic: at least its load less every
claim it could show, at most its whole load. The claim script raises the estimate to the first
bound and lowers it to the second (:meth:`cachesvc.recache.ledger.Ledger.claim`): online traffic
that rises is seen at once, and no snapshot that merely has not caught up lowers the estimate,
however slow the machine or late the read.

Online traffic that falls while recache keeps the Render Services at the line is proven only by a
snapshot in which few recache requests render. So when the least online load the snapshots allow
has stayed a margin below the estimate for :attr:`OnlineEstimate.confirm_after` seconds, the
scheduler claims nothing more until the registry shows the fall, or until the requests it has in
flight are answered (its snapshots are then exact, and the estimate with them). A hold that frees
nothing doubles the wait before the next one (up to :data:`MAX_CONFIRM_AFTER`); one that frees
budget resets it. Timing decides only when budget freed by online traffic is used, never whether
the line holds.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from cachesvc.recache.ledger import Budget

CONFIRM_AFTER = 2.0
"""Seconds the snapshots must doubt the estimate before the scheduler holds its claims to check it."""
MAX_CONFIRM_AFTER = 300.0
"""The longest wait between checks that found nothing."""


def doubt_margin(line: int) -> int:
    """How far below the estimate the snapshots must point to be worth a check: a tenth of the line, at least 2."""
    return max(2, line // 10)


class OnlineEstimate:
    """The estimate (``value``, None before the first claim) and whether claims are held to confirm it."""

    log = Logger()

    def __init__(self, clock: Any, confirm_after: float = CONFIRM_AFTER) -> None:
        self.clock = clock
        self.value: int | None = None
        self.base_confirm_after = self.confirm_after = confirm_after
        self._doubted_since: float | None = None
        self._could_be = 0  # the highest least-online load the snapshots allowed while doubting
        self._held_since: float | None = None
        self._held_at = 0  # the estimate when the hold began

    @property
    def holding(self) -> bool:
        """True while claims wait for the registry to confirm or correct the estimate."""
        return self._held_since is not None

    def update(self, budget: Budget, line: int, mine_in_flight: int) -> None:
        """Take a claim's answer: the estimate it used, the least online load its snapshot allowed."""
        now = self.clock.seconds()
        self.value = budget.online
        margin = doubt_margin(line)
        if self._held_since is not None:
            if budget.online <= self._could_be + margin or mine_in_flight == 0:
                self._release(now, margin)
            return
        if budget.online - budget.least_online < margin:
            self._doubted_since = None
            return
        if self._doubted_since is None:
            self._doubted_since, self._could_be = now, budget.least_online
            return
        self._could_be = max(self._could_be, budget.least_online)
        if now - self._doubted_since >= self.confirm_after:
            self._held_since, self._held_at = now, budget.online
            self.log.info("online load estimate {value} unconfirmed for {secs:.1f}s (snapshots allow {low}): "
                          "claims wait until the Render Services' load confirms it or the requests in flight "
                          "are answered", value=budget.online, secs=now - self._doubted_since, low=self._could_be)

    def _release(self, now: float, margin: int) -> None:
        assert self._held_since is not None and self.value is not None
        freed = self._held_at - self.value
        if freed >= margin:
            self.confirm_after = self.base_confirm_after
        else:
            self.confirm_after = min(MAX_CONFIRM_AFTER, self.confirm_after * 2)
        self.log.info("online load estimate {value} (was {was}) after holding claims for {secs:.1f}s; "
                      "next check after {after:g}s of doubt", value=self.value, was=self._held_at,
                      secs=now - self._held_since, after=self.confirm_after)
        self._held_since = self._doubted_since = None
