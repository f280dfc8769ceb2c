"""`AttemptBudget`: the budget signed for the primary is what an attempt has left less the
way back, the 95th percentile of the link's part of recent answers (no loop, no clock)."""

from __future__ import annotations

from latitude.gateway.budget import MARGIN_S, AttemptBudget
from latitude.gateway.recent import HISTORY, MIN_HISTORY


def test_before_a_few_answers_only_the_margin_is_kept_back():
    b = AttemptBudget()
    for _ in range(MIN_HISTORY - 1):
        b.answered(0.5)
    assert b.for_primary_ms(3.0) == int((3.0 - MARGIN_S) * 1000)


def test_the_way_back_is_the_links_slow_end_not_its_quickest():
    b = AttemptBudget()
    for i in range(HISTORY):  # 0.10 s mostly, a tenth of the answers 0.30 s
        b.answered(0.30 if i % 10 == 0 else 0.10)
    assert b.way_back_s == 0.30
    assert b.for_primary_ms(3.0) == int((3.0 - 0.30 - MARGIN_S) * 1000)


def test_the_way_back_follows_the_link():
    b = AttemptBudget()
    for _ in range(HISTORY):
        b.answered(0.40)
    for _ in range(HISTORY):
        b.answered(0.05)
    assert b.way_back_s == 0.05


def test_never_more_than_half_of_what_is_left():
    b = AttemptBudget()
    for _ in range(HISTORY):
        b.answered(5.0)  # longer than the deadline: a bad figure, or a link in trouble
    assert b.for_primary_ms(3.0) == 1500
    assert b.for_primary_ms(0.0) == 0


def test_a_negative_link_part_counts_as_none():
    """`Server-Timing` may claim more than the whole exchange took (it is not signed)."""
    b = AttemptBudget()
    for _ in range(HISTORY):
        b.answered(-2.0)
    assert b.way_back_s == 0.0
