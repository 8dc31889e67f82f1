"""How fast REGISTERs may arrive in a realm: registration storms are spread out.

After a power cut or a network outage every phone of a site registers at once,
and keeps retransmitting while the SBC (or the registrar behind it) works through
the backlog: a registration storm. With ``registers_per_second`` set on a realm,
the REGISTERs above that rate (a token bucket holding one second's worth) are
answered at once with ``503 Service Unavailable`` and a ``Retry-After`` (RFC 3261
21.5.4, 20.33) drawn at random from :data:`RETRY_AFTER`, so the refused phones come
back spread over most of a minute instead of together.

A digest registration is two REGISTERs: the one the registrar challenges and the
one answering that challenge. Both are counted, so a rate of 50 lets about 25
phones a second register; but the answer is never refused while the bucket has
room for debt (one second's worth): a phone that was challenged registers, rather
than being turned away after the SBC spent a challenge on it, and the challenges
that follow wait until the debt is paid. An answer is a REGISTER whose
Authorization carries a nonce the embedded registrar issued and that is still
fresh (an HMAC of its time: it cannot be forged, and checking it is cheap); a
stale or foreign nonce counts as a new REGISTER, and a replayed one can run up no
more than the bounded debt. Only the embedded registrar can tell an answer (its
nonces are its own); in relay mode every REGISTER counts alike.

Pure: no I/O, no clock (``now`` is monotonic seconds). Realm names come from the
configuration, so the table is bounded by it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Final

#: Seconds, inclusive, a refused REGISTER's Retry-After is drawn from.
RETRY_AFTER: Final = (10, 60)


@dataclass(slots=True)
class _Bucket:
    rate: float
    tokens: float
    last: float
    refused: int = 0


class RegisterRate:
    """A token bucket of REGISTERs per realm; the rate is the realm's policy's."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._rng = rng or random.Random()

    def take(self, realm: str, rate: float, now: float, *, answer: bool = False) -> int | None:
        """None when a REGISTER may go on in ``realm`` at ``rate`` a second (and it is
        counted); else the Retry-After seconds of its 503. ``answer``: it answers a
        challenge of the registrar's, and may take the bucket into debt."""
        burst = max(1.0, math.ceil(rate))
        bucket = self._buckets.get(realm)
        if bucket is None:
            bucket = self._buckets[realm] = _Bucket(rate, burst, now)
        elapsed = max(0.0, now - bucket.last)
        # A reload that changed the rate applies from now on.
        bucket.tokens = min(burst, bucket.tokens + elapsed * bucket.rate)
        bucket.rate, bucket.last = rate, now
        if bucket.tokens >= 1.0 - 1e-9 or (answer and bucket.tokens >= 1.0 - burst - 1e-9):
            bucket.tokens -= 1.0
            return None
        bucket.refused += 1
        return self._rng.randint(*RETRY_AFTER)

    def refused(self) -> dict[str, int]:
        """REGISTERs refused so far, by realm (only grows)."""
        return {realm: bucket.refused for realm, bucket in sorted(self._buckets.items())}
