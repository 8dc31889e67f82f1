"""Per-source admission of TLS handshakes: a concurrency cap and a token bucket.

Sans-I/O: the caller passes the current time, so the limiter is tested with a fake
clock. A TLS handshake costs the server an asymmetric signature (and, with mutual
TLS, a chain verification); a source that opens connections and never finishes
them, or reconnects in a tight loop, is refused before that work begins.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from sbc.transport.base import HandshakeLimit

__all__ = ["MAX_TRACKED_SOURCES", "Admission", "HandshakeLimiter"]

#: Sources tracked at once; beyond it, idle sources are forgotten and, if every one is
#: busy, new sources are refused (a flood from many addresses is the kernel's job).
MAX_TRACKED_SOURCES: Final = 65536


class Admission(enum.Enum):
    """The verdict on a new handshake."""

    ADMITTED = "admitted"
    TOO_MANY_CONCURRENT = "too many concurrent handshakes"
    TOO_FAST = "handshake rate exceeded"
    TOO_MANY_SOURCES = "too many sources tracked"


@dataclass(slots=True)
class _Source:
    in_flight: int
    tokens: float
    updated: float


class HandshakeLimiter:
    """Counts handshakes by source address; ``admit`` then ``finish`` for each."""

    def __init__(self, limit: HandshakeLimit, max_sources: int = MAX_TRACKED_SOURCES) -> None:
        self._limit = limit
        self._max_sources = max_sources
        self._sources: dict[str, _Source] = {}

    def __len__(self) -> int:
        return len(self._sources)

    def in_flight(self, source: str) -> int:
        entry = self._sources.get(source)
        return 0 if entry is None else entry.in_flight

    def admit(self, source: str, now: float) -> Admission:
        """Admit a handshake from ``source`` at ``now`` (seconds); counted if ADMITTED."""
        limit = self._limit
        entry = self._sources.get(source)
        if entry is None:
            if len(self._sources) >= self._max_sources:
                self._forget_idle(now)
                if len(self._sources) >= self._max_sources:
                    return Admission.TOO_MANY_SOURCES
            entry = _Source(0, float(limit.burst), now)
            self._sources[source] = entry
        else:
            self._refill(entry, now)
        if limit.concurrent and entry.in_flight >= limit.concurrent:
            return Admission.TOO_MANY_CONCURRENT
        if limit.rate:
            if entry.tokens < 1.0:
                return Admission.TOO_FAST
            entry.tokens -= 1.0
        entry.in_flight += 1
        return Admission.ADMITTED

    def finish(self, source: str, now: float) -> None:
        """A handshake admitted for ``source`` ended, whether it succeeded or not."""
        entry = self._sources.get(source)
        if entry is None or entry.in_flight == 0:
            return
        entry.in_flight -= 1
        self._refill(entry, now)
        if self._is_idle(entry):
            del self._sources[source]

    def _refill(self, entry: _Source, now: float) -> None:
        limit = self._limit
        if limit.rate and now > entry.updated:
            refill = (now - entry.updated) * limit.rate
            entry.tokens = min(float(limit.burst), entry.tokens + refill)
        entry.updated = max(entry.updated, now)

    def _is_idle(self, entry: _Source) -> bool:
        # A source with a full bucket and nothing in flight is the same as a new one.
        return entry.in_flight == 0 and (not self._limit.rate or entry.tokens >= self._limit.burst)

    def _forget_idle(self, now: float) -> None:
        for source, entry in list(self._sources.items()):
            self._refill(entry, now)
            if self._is_idle(entry):
                del self._sources[source]
