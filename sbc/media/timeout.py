"""Media inactivity: when a session has carried nothing for too long.

Pure: the caller feeds activity and asks with the current time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class InactivityTimer:
    """Fires once per silent period: ``timeout`` normally, ``hold_timeout`` on hold."""

    timeout: float
    hold_timeout: float
    last_activity: float
    fired: bool = False

    def activity(self, now: float) -> None:
        """A packet was accepted at ``now``; re-arms the timer."""
        if now > self.last_activity:
            self.last_activity = now
        self.fired = False

    @property
    def shortest(self) -> float:
        """The smaller of the two limits: no check can fire before it."""
        return min(self.timeout, self.hold_timeout)

    def limit(self, on_hold: bool) -> float:
        return self.hold_timeout if on_hold else self.timeout

    def check(self, now: float, on_hold: Callable[[], bool]) -> float | None:
        """Idle seconds when the timeout is due now (once per silent period), else None.

        ``on_hold`` is asked only once the silence outlasts the shorter limit: the
        relay works it out by walking a session's streams, and most sessions are
        not silent.
        """
        idle = now - self.last_activity
        if self.fired or idle < self.shortest or idle < self.limit(on_hold()):
            return None
        self.fired = True
        return idle

    def deadline(self, on_hold: bool) -> float:
        return self.last_activity + self.limit(on_hold)
