"""`ForwardingSlots`: a request waits for a slot only while it can still expect an answer
within its deadline; a free slot is always taken."""

from __future__ import annotations

import asyncio
import time

import pytest

from latitude.gateway.admission import ForwardingSlots
from latitude.gateway.answers import Busy
from latitude.gateway.recent import MIN_HISTORY, REESTIMATE_EVERY


def slots_holding(n_slots: int, held_s: float, *, queue: int = 8) -> ForwardingSlots:
    slots = ForwardingSlots(n_slots, queue)
    for _ in range(max(MIN_HISTORY, REESTIMATE_EVERY)):
        slots.record(held_s)
    return slots


async def hold(slots: ForwardingSlots, seconds: float, started: asyncio.Event) -> None:
    async with slots.slot(10.0):
        started.set()
        await asyncio.sleep(seconds)


async def occupied(slots: ForwardingSlots, seconds: float) -> asyncio.Task:
    started = asyncio.Event()
    task = asyncio.ensure_future(hold(slots, seconds, started))
    await started.wait()
    return task


def test_the_estimates_follow_the_holds():
    slots = ForwardingSlots(4, 8)
    for _ in range(MIN_HISTORY - 1):
        slots.record(0.5)
    assert slots.hold_p95_s == 0.0  # too few to guess from
    for i in range(40):
        slots.record(0.1 if i % 10 else 2.0)
    assert 0.1 <= slots.hold_mean_s < 0.5
    assert slots.hold_p95_s == 2.0
    slots.waiting = 7
    assert slots.expected_wait_s() == pytest.approx(8 * slots.hold_mean_s / 4)


async def test_a_request_that_could_not_be_answered_in_time_is_refused_at_once():
    slots = slots_holding(1, 1.0)
    holder = await occupied(slots, 0.5)
    t0 = time.monotonic()
    with pytest.raises(Busy, match="deadline"):
        async with slots.slot(1.5):  # a slot in ~1 s, then ~1 s in flight: past 1.5 s
            pass
    assert time.monotonic() - t0 < 0.1
    assert slots.waiting == 0
    await holder


async def test_a_request_that_can_be_answered_in_time_waits_for_its_slot():
    slots = slots_holding(1, 0.01)
    holder = await occupied(slots, 0.05)
    async with slots.slot(1.0):
        assert holder.done()  # it got the slot the holder let go
    assert slots.waiting == 0


async def test_a_queued_request_is_refused_once_waiting_longer_would_leave_too_little():
    slots = slots_holding(1, 0.02)
    holder = await occupied(slots, 1.0)
    t0 = time.monotonic()
    with pytest.raises(Busy, match="came free"):
        async with slots.slot(0.2):
            pass
    waited = time.monotonic() - t0
    assert 0.15 <= waited < 0.5, waited  # 0.2 s left less the ~0.02 s a slot is held
    holder.cancel()


async def test_a_free_slot_is_taken_however_slow_the_primary_has_been():
    slots = slots_holding(2, 5.0)
    async with slots.slot(0.1):
        async with slots.slot(0.1):
            pass


async def test_past_the_queue_a_request_is_refused_naming_the_settings():
    slots = ForwardingSlots(1, 1)
    holder = await occupied(slots, 1.0)
    queued = asyncio.ensure_future(slots.slot(5.0).__aenter__())
    await asyncio.sleep(0.01)
    with pytest.raises(Busy, match="max_connections, queue_size"):
        async with slots.slot(5.0):
            pass
    holder.cancel()
    queued.cancel()


async def test_the_refusal_is_known_before_asking_for_a_slot():
    slots = slots_holding(1, 1.0)
    assert slots.refusal(1.5) is None  # a slot is free
    holder = await occupied(slots, 0.5)
    busy = slots.refusal(1.5)
    assert isinstance(busy, Busy) and "deadline" in str(busy)
    assert slots.refusal(10.0) is None  # it may wait: ~1 s, then ~1 s in flight, of 10
    assert slots.waiting == 0  # asking queues nothing
    await holder
