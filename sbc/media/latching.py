"""Latching: learn each side's real media source, then hold it (RTP bleed protection).

The SDP address of a side is only a hint (it is wrong behind NAT). The first packet
that arrives on a side's local port fixes, or *latches*, that side's source address
and port; media for that side is then sent there (symmetric RTP, RFC 4961). Once
latched, packets from any other source are dropped and counted: this is what stops
the RTP bleed attack, where a stranger sprays a relay's ports and is answered with
the call's media, and RTP injection into a call. Re-latching on a new SSRC from a new
source is a policy knob, off by default, because it is exactly what bleed exploits.

Pure: a `Latch` is a frozen value; `Latch.on_packet` returns the next one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from sbc.media.values import Endpoint


class LatchState(enum.Enum):
    UNLATCHED = "unlatched"
    LATCHED = "latched"


class LatchVerdict(enum.Enum):
    """What to do with one packet."""

    #: First packet: the source is learnt now; forward.
    LATCHED = "latched"
    #: From the latched source; forward.
    ACCEPT = "accept"
    #: New source with a new SSRC and the policy allows re-latching; forward.
    RELATCHED = "relatched"
    #: From another source, strict_source off: forward, keep the latch.
    ACCEPT_FOREIGN = "accept-foreign"
    #: From another source: drop and count.
    DROP = "drop"

    @property
    def forward(self) -> bool:
        return self is not LatchVerdict.DROP


@dataclass(frozen=True)
class LatchPolicy:
    strict_source: bool = True
    relatch_on_new_ssrc: bool = False


@dataclass(frozen=True)
class Latch:
    """The learnt source of one side's packets on one local port."""

    state: LatchState = LatchState.UNLATCHED
    source: Endpoint | None = None
    ssrc: int | None = None

    def on_packet(
        self, source: Endpoint, ssrc: int | None, policy: LatchPolicy
    ) -> tuple[Latch, LatchVerdict]:
        """The latch after a packet from ``source`` (``ssrc`` None if not RTP/RTCP)."""
        if self.state is LatchState.UNLATCHED:
            return Latch(LatchState.LATCHED, source, ssrc), LatchVerdict.LATCHED
        if source == self.source:
            if ssrc is not None and ssrc != self.ssrc:
                # Same source, new SSRC (RFC 3550 8.2 collision, a transfer behind a
                # PBX): the source is what we trust, follow the SSRC.
                return Latch(self.state, self.source, ssrc), LatchVerdict.ACCEPT
            return self, LatchVerdict.ACCEPT
        if policy.relatch_on_new_ssrc and ssrc is not None and ssrc != self.ssrc:
            return Latch(LatchState.LATCHED, source, ssrc), LatchVerdict.RELATCHED
        if not policy.strict_source:
            return self, LatchVerdict.ACCEPT_FOREIGN
        return self, LatchVerdict.DROP

    @property
    def latched(self) -> bool:
        return self.state is LatchState.LATCHED

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "source": None if self.source is None else self.source.to_dict(),
            "ssrc": self.ssrc,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Latch:
        source = data.get("source")
        return cls(
            LatchState(data["state"]),
            None if source is None else Endpoint.from_dict(source),
            _ssrc(data.get("ssrc")),
        )


def _ssrc(value: Any) -> int | None:
    """An SSRC as JSON or a Redis hash (text) gives it back; None for anything but
    a 32-bit number, as for a latch that has seen no SSRC (it learns the next one)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        ssrc = int(value)
    except ValueError:
        return None
    return ssrc if 0 <= ssrc <= 0xFFFFFFFF else None
