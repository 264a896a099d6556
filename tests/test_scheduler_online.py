"""The online load estimate on a Clock: when its doubts hold the scheduler's claims, and for how long."""

from __future__ import annotations

from twisted.internet.task import Clock

from cachesvc.recache.ledger import Budget
from cachesvc.recache.online import CONFIRM_AFTER, MAX_CONFIRM_AFTER, OnlineEstimate, doubt_margin

LINE = 70  # margin 7


def answer(online: int, least: int) -> Budget:
    return Budget(budget=0, unreflected=0, online=online, in_flight=30, least_online=least)


def test_the_margin_is_a_tenth_of_the_line_at_least_two() -> None:
    assert (doubt_margin(70), doubt_margin(28), doubt_margin(5)) == (7, 2, 2)


def test_the_estimate_is_the_last_answers_and_a_snapshot_that_has_not_caught_up_holds_nothing() -> None:
    clock = Clock()
    estimate = OnlineEstimate(clock)
    assert estimate.value is None
    # Right after a claim of 30 the snapshots allow as little as 10: a doubt, cleared by the next snapshot.
    for least in (10, 40, 12, 39) * 10:
        estimate.update(answer(40, least), LINE, 30)
        clock.advance(0.5)
    assert estimate.value == 40 and not estimate.holding


def test_a_lasting_doubt_holds_claims_until_the_registry_shows_the_fall() -> None:
    clock = Clock()
    estimate = OnlineEstimate(clock)
    estimate.update(answer(40, 10), LINE, 30)
    clock.advance(CONFIRM_AFTER - 0.1)
    estimate.update(answer(40, 9), LINE, 30)
    assert not estimate.holding
    clock.advance(0.1)
    estimate.update(answer(40, 10), LINE, 30)
    assert estimate.holding
    estimate.update(answer(25, 8), LINE, 20)  # falling with the requests answered: not yet within the margin of 10
    assert estimate.holding
    estimate.update(answer(17, 9), LINE, 12)
    assert not estimate.holding and estimate.value == 17
    assert estimate.confirm_after == CONFIRM_AFTER  # it freed budget: the next doubt is checked as soon


def test_a_hold_that_frees_nothing_makes_the_next_wait_longer_up_to_the_cap() -> None:
    clock = Clock()
    estimate = OnlineEstimate(clock)
    waits = []
    for _ in range(12):
        estimate.update(answer(40, 10), LINE, 30)
        clock.advance(estimate.confirm_after)
        estimate.update(answer(40, 10), LINE, 30)
        assert estimate.holding
        estimate.update(answer(40, 30), LINE, 0)  # every request of ours answered: the estimate stands
        assert not estimate.holding
        waits.append(estimate.confirm_after)
    assert waits[:3] == [2 * CONFIRM_AFTER, 4 * CONFIRM_AFTER, 8 * CONFIRM_AFTER]
    assert waits[-1] == MAX_CONFIRM_AFTER
