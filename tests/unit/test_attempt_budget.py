"""`AttemptBudget`: the budget signed for the primary is what an attempt has left less the
link's quickest part of recent answers (a fake clock, no loop)."""

from __future__ import annotations

import pytest

from latitude.gateway.budget import MARGIN_S, WINDOW_S, AttemptBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_before_any_answer_only_the_margin_is_kept_back(clock):
    assert AttemptBudget(clock=clock).for_primary_ms(3.0) == int((3.0 - MARGIN_S) * 1000)


def test_the_quickest_link_part_is_kept_back(clock):
    b = AttemptBudget(clock=clock)
    for link_s in (0.30, 0.10, 0.25):
        b.answered(link_s)
    assert b.quickest_s() == pytest.approx(0.10)
    assert b.for_primary_ms(3.0) == int((3.0 - 0.10 - MARGIN_S) * 1000)


def test_never_more_than_half_of_what_is_left(clock):
    b = AttemptBudget(clock=clock)
    b.answered(5.0)  # a link part longer than the deadline: a bad figure, or a cut link
    assert b.for_primary_ms(3.0) == 1500
    assert b.for_primary_ms(0.0) == 0


def test_a_negative_link_part_counts_as_none(clock):
    """`Server-Timing` may claim more than the whole exchange took (it is not signed)."""
    b = AttemptBudget(clock=clock)
    b.answered(-2.0)
    assert b.quickest_s() == 0.0


def test_the_estimate_follows_a_link_that_slows_down(clock):
    b = AttemptBudget(clock=clock)
    b.answered(0.05)
    clock.now += WINDOW_S  # the next window: the last one still counts
    b.answered(0.20)
    assert b.quickest_s() == pytest.approx(0.05)
    clock.now += WINDOW_S  # two windows on: 0.05 is forgotten
    assert b.quickest_s() == pytest.approx(0.20)
    clock.now += 2 * WINDOW_S  # a long quiet spell forgets everything
    assert b.quickest_s() == 0.0
