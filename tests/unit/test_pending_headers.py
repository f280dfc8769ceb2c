"""The header deadline: one timer per worker for all connections waiting for their headers."""

from __future__ import annotations

from latitude.gateway.connections import _PendingHeaders


class FakeLoop:
    """A loop clock the test moves by hand, and the timers armed on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.armed: list[tuple[float, object]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback):
        self.armed.append((when, callback))
        return object()

    def fire_due(self) -> None:
        due = [cb for when, cb in self.armed if when <= self.now]
        self.armed = [(w, cb) for w, cb in self.armed if w > self.now]
        for cb in due:
            cb()


class Waiting:
    """A connection waiting for its headers: what `_PendingHeaders` asks of a protocol."""

    def __init__(self, pending: _PendingHeaders, loop: FakeLoop) -> None:
        self.pending = pending
        self._waiting_since = loop.time()
        self.timed_out = False
        pending.add(self, limit=1000)

    def _header_timeout(self) -> None:
        self.timed_out = True
        self.done()

    def done(self) -> None:
        self.pending.waiting.pop(self, None)


def test_one_timer_for_many_connections_and_each_times_out_at_its_own_deadline():
    loop = FakeLoop()
    pending = _PendingHeaders(loop, timeout_s=10.0)
    first = Waiting(pending, loop)
    loop.now += 4
    second = Waiting(pending, loop)
    third = Waiting(pending, loop)
    assert len(loop.armed) == 1 and loop.armed[0][0] == 110.0  # the oldest one's deadline

    third.done()  # its headers arrived: nothing to time out
    loop.now = 110.0
    loop.fire_due()
    assert first.timed_out and not second.timed_out
    assert [when for when, _ in loop.armed] == [114.0]  # re-armed for the next oldest

    loop.now = 113.9
    loop.fire_due()
    assert not second.timed_out
    loop.now = 114.0
    loop.fire_due()
    assert second.timed_out and not third.timed_out
    assert loop.armed == [] and pending.waiting == {}


def test_a_timer_that_fires_after_its_connection_finished_rearms_for_the_next():
    loop = FakeLoop()
    pending = _PendingHeaders(loop, timeout_s=5.0)
    early = Waiting(pending, loop)
    loop.now += 3
    late = Waiting(pending, loop)
    early.done()
    loop.now = 105.0  # the early one's deadline: nobody is overdue yet
    loop.fire_due()
    assert not late.timed_out and [when for when, _ in loop.armed] == [108.0]
    loop.now = 108.0
    loop.fire_due()
    assert late.timed_out
