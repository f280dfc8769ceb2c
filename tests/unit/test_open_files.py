"""`latitude serve` raises its soft limit on open files to the hard one (a fake `resource`)."""

from __future__ import annotations

from latitude.gateway.serve import OPEN_FILES_WANTED, raise_open_files_limit


class Limits:
    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse
        self.set_to: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.set_to.append(limits)
        self.soft, self.hard = limits


def test_the_soft_limit_is_raised_to_the_hard_one():
    limits = Limits(1024, 524288)
    assert raise_open_files_limit(limits) == 524288
    assert limits.set_to == [(524288, 524288)]


def test_an_unlimited_hard_limit_gives_a_bounded_soft_one():
    limits = Limits(1024, Limits.RLIM_INFINITY)
    assert raise_open_files_limit(limits) == OPEN_FILES_WANTED
    assert limits.set_to == [(OPEN_FILES_WANTED, Limits.RLIM_INFINITY)]


def test_a_limit_already_high_enough_is_left_alone():
    for soft, hard in ((20000, 20000), (Limits.RLIM_INFINITY, Limits.RLIM_INFINITY)):
        limits = Limits(soft, hard)
        assert raise_open_files_limit(limits) == soft
        assert limits.set_to == []


def test_a_refusal_keeps_the_soft_limit():
    limits = Limits(1024, 4096, refuse=True)
    assert raise_open_files_limit(limits) == 1024
