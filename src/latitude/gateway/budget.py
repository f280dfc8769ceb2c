"""`AttemptBudget`: how long the primary may spend on one forwarded attempt
(`Latitude-Budget-Ms`).

The primary counts the budget from the request's arrival and stops a run that outlasts it
with a signed 503 (docs/gateway.md). That answer must still cross the link back before the
replica's own deadline, or the replica times out first: it closes the pooled connection (the
late answer could land on the next request), the next write opens a new one across the ocean,
and the client gets a `504` instead of a 503 it can retry after (benchmarks/README.md,
sessions 10 and 11). So what is signed is what the attempt has left less the way back: the
link's part of recent answers (each answer's time less the primary's own, its
`Server-Timing`), that is the link's round trip and the wait at the primary's door, which the
primary's clock cannot see.

The way back is the 95th percentile of the link's part of recent answers, not their minimum:
under load (measured in the lab at 256 clients over a 100 ms link) it was 101-108 ms at the
median but 200-340 ms at the 90th percentile, and with a budget that left only the quickest
of them 25-150 attempts still timed out per 5 s run (benchmarks/README.md, session 11). It
never takes more than half of what is left: an odd figure (`Server-Timing` is not signed) can
shorten the primary's time, not take it away. An answer without the primary's entry (a
primary gateway without `Observe`, which `latitude serve` always has) gives no figure: its
app's time would pass for the link's.
"""

from __future__ import annotations

from latitude.gateway.recent import RecentFigures

# Kept back besides the link's part: the primary making and signing its 503, and the loops'
# lag on both sides.
MARGIN_S = 0.02


class AttemptBudget:
    """The link's part of the forwarded answers lately, and what that leaves the primary of a
    deadline."""

    def __init__(self) -> None:
        self._link = RecentFigures()

    @property
    def way_back_s(self) -> float:
        """The link's part of an answer now, 95th percentile (0 before the first few)."""
        return self._link.p95

    def answered(self, link_s: float) -> None:
        """An attempt's answer (any status) spent `link_s` outside the primary's own time."""
        self._link.add(max(0.0, link_s))

    def for_primary_ms(self, left_s: float) -> int:
        """The budget to sign for an attempt with `left_s` of its deadline left."""
        spare_s = min(self.way_back_s + MARGIN_S, left_s / 2)
        return max(0, int((left_s - spare_s) * 1000))
