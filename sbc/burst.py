"""Log lines for failures that repeat: the first at once, then a count per interval."""

from __future__ import annotations

import math


class BurstLog:
    """Rate limit for a failure that comes in bursts: ``hit(now)`` says when to log.

    The first hit logs at once; the ones within ``interval`` seconds after are only
    counted, and the next line after the interval reports how many there were.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = -math.inf
        self._quiet = 0

    def hit(self, now: float) -> int | None:
        """None: stay quiet. Otherwise log now; the int is how many hits since the
        last line were not logged."""
        if now < self._next:
            self._quiet += 1
            return None
        quiet, self._quiet = self._quiet, 0
        self._next = now + self.interval
        return quiet
