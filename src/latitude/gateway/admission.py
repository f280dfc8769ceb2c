"""`ForwardingSlots`: how many forwarded requests a worker has in flight (at a replica) or
running (at the primary), and which of the rest may wait for a slot.

A request that waits in the queue and then runs out of deadline in flight is the worst outcome
under overload: the primary does its work for nobody, the timed-out connection is closed (its
answer may still arrive) and the pool opens a new one across the ocean. At 256 concurrent
clients against 64 slots that fed itself: 7 forwarded writes/s instead of ~100, 454 new link
connections and 374 `504`s in a 5 s window (benchmarks/README.md). So a request is admitted
to the queue only if it can expect a slot soon enough to leave it the time a slot is held now
(its recent 95th percentile): otherwise it is refused at once (`Busy`, 503 + Retry-After,
nothing sent), and a queued request that outwaits that allowance is refused then.

The primary bounds its forwarded runs the same way (`[gateway] max_runs`, per worker): past
its cores and database pools more runs at once only make each slower, until all of them
outlast their budgets and are stopped half-done (benchmarks/README.md, session 11). A request
waits for a run slot before its idempotency claim, so one refused there cost nothing.

A free slot is always taken, whatever the estimate: with slots free there is no queue to bound,
and a slow endpoint must not make the others wait or fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from latitude.gateway.answers import Busy
from latitude.gateway.recent import RecentFigures


class ForwardingSlots:
    """At most `slots` forwarded requests in flight (one pooled connection each, so steady load
    opens no new connection), at most `queue` more waiting for a slot, and none waiting that
    could not be answered within its deadline."""

    def __init__(
        self, slots: int, queue: int, *, doing: str = "in flight", setting: str = "max_connections"
    ) -> None:
        self.slots, self.queue = slots, queue
        # How refusals name the slots: what a held one does, and the setting that sizes them.
        self._doing, self._setting = doing, setting
        self._free = asyncio.Semaphore(slots)
        self.waiting = 0
        self._held = RecentFigures()

    @property
    def hold_p95_s(self) -> float:
        """How long a slot is held now, 95th percentile (0 before the first few holds)."""
        return self._held.p95

    @property
    def hold_mean_s(self) -> float:
        return self._held.mean

    def record(self, held_s: float) -> None:
        """One slot hold ended after `held_s` (answered, failed or timed out alike)."""
        self._held.add(held_s)

    def expected_wait_s(self) -> float:
        """How long the next request to queue would wait for a slot, by Little's law: those
        ahead of it, plus itself, served `slots` at a time at the mean hold."""
        return (self.waiting + 1) * self.hold_mean_s / self.slots

    @contextlib.asynccontextmanager
    async def slot(self, timeout_s: float):
        """Hold a slot for one attempt that has `timeout_s` left of its deadline."""
        if self._free.locked():
            await self._wait_for_slot(timeout_s)
        else:
            await self._free.acquire()  # free: no await suspends here
        started = time.monotonic()
        try:
            yield
        finally:
            self._free.release()
            self.record(time.monotonic() - started)

    def refusal(self, timeout_s: float) -> Busy | None:
        """Why a request with `timeout_s` left would be refused a slot now, or None (a slot is
        free, or it may wait for one). Asked before the request's own work (its session, its
        signature), so that a refusal under overload costs next to nothing."""
        if not self._free.locked():
            return None
        if self.waiting >= self.queue:
            return Busy(
                f"{self.slots} forwarded requests are {self._doing} and {self.waiting} wait "
                f"([gateway] {self._setting}, queue_size)"
            )
        expected_s = self.expected_wait_s()
        if expected_s > timeout_s - self.hold_p95_s:
            return Busy(
                f"{self.slots} forwarded requests are {self._doing} and {self.waiting} wait: a "
                f"slot would come in ~{expected_s:.2f} s and one is held ~{self.hold_p95_s:.2f} s "
                f"now, more than the {timeout_s:.2f} s left of this request's deadline "
                f"([gateway] {self._setting}, deadline_s)"
            )
        return None

    async def _wait_for_slot(self, timeout_s: float) -> None:
        if (busy := self.refusal(timeout_s)) is not None:
            raise busy
        allowance_s = timeout_s - self.hold_p95_s
        self.waiting += 1
        try:
            await asyncio.wait_for(self._free.acquire(), allowance_s)
        except TimeoutError:
            raise Busy(
                f"no slot came free within {allowance_s:.2f} s, which would have left less than "
                f"the ~{self.hold_p95_s:.2f} s one is held now ([gateway] {self._setting})"
            ) from None
        finally:
            self.waiting -= 1
