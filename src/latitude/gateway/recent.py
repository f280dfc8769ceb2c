"""`RecentFigures`: the last few durations of one kind, and their 95th percentile and mean,
recomputed every few figures rather than at each (the estimates that admission and the
attempt's budget decide by)."""

from __future__ import annotations

from collections import deque

# Figures remembered: enough for a stable 95th percentile, few enough to follow a primary or a
# link that slows down within a second or two of load.
HISTORY = 64
# Fewer figures than this and there is no estimate yet (0: nothing is decided on a guess).
MIN_HISTORY = 8
# The estimates are recomputed after this many figures, not at every one.
REESTIMATE_EVERY = 8


class RecentFigures:
    def __init__(self) -> None:
        self._figures: deque[float] = deque(maxlen=HISTORY)
        self._since_estimate = 0
        self.p95 = 0.0
        self.mean = 0.0

    def add(self, figure: float) -> None:
        self._figures.append(figure)
        self._since_estimate += 1
        if self._since_estimate >= REESTIMATE_EVERY and len(self._figures) >= MIN_HISTORY:
            self._since_estimate = 0
            ordered = sorted(self._figures)
            self.p95 = ordered[int(0.95 * (len(ordered) - 1))]
            self.mean = sum(ordered) / len(ordered)
