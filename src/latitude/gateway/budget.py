"""`AttemptBudget`: how long the primary may spend on one forwarded attempt
(`Latitude-Budget-Ms`).

The primary counts the budget from the request's arrival and stops a run that outlasts it
with a signed 503 (docs/gateway.md). That answer must still cross the link back before the
replica's own deadline, or the replica times out first: it closes the pooled connection (the
late answer could land on the next request), the next write opens a new one across the ocean,
and the client gets a `504` instead of a 503 it can retry after (benchmarks/README.md,
sessions 10 and 11). So what is signed is what the attempt has left less the quickest answer
lately less the primary's own part of it (its `Server-Timing`): the link's round trip
and the wait at the primary's door, which the primary's clock cannot see.

The quickest answer is the minimum over two windows of `WINDOW_S` (this one and the last), so
that it follows a link that slows down within seconds, and never takes more than half of
what is left: an odd figure (`Server-Timing` is not signed) can shorten the primary's time,
not take it away.
"""

from __future__ import annotations

import math
import time

# How long one window of answer times lasts; the estimate is the minimum of two.
WINDOW_S = 5.0
# Kept back besides the link's part: the primary making and signing its 503, and the loops'
# lag on both sides (also all there is before the first answer gives a figure).
MARGIN_S = 0.02


class AttemptBudget:
    """The link's quickest part of the forwarded answers lately, and what that leaves the
    primary of a deadline."""

    def __init__(self, *, clock=time.monotonic) -> None:
        self._clock = clock
        self._window_started = clock()
        self._this_window = math.inf
        self._last_window = math.inf

    def answered(self, link_s: float) -> None:
        """An attempt's answer (any status) spent `link_s` outside the primary's own time."""
        self._roll()
        self._this_window = min(self._this_window, max(0.0, link_s))

    def quickest_s(self) -> float:
        """The link's quickest part in this window and the last, or 0 before the first."""
        self._roll()
        quickest = min(self._this_window, self._last_window)
        return 0.0 if quickest == math.inf else quickest

    def for_primary_ms(self, left_s: float) -> int:
        """The budget to sign for an attempt with `left_s` of its deadline left."""
        spare_s = min(self.quickest_s() + MARGIN_S, left_s / 2)
        return max(0, int((left_s - spare_s) * 1000))

    def _roll(self) -> None:
        now = self._clock()
        if now - self._window_started < WINDOW_S:
            return
        # A gap of two windows or more leaves nothing recent in the last one.
        recent = now - self._window_started < 2 * WINDOW_S
        self._last_window = self._this_window if recent else math.inf
        self._this_window = math.inf
        self._window_started = now
