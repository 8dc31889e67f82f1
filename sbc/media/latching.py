"""Latching: learn each side's real media source, then hold it (RTP bleed protection).

The SDP address of a side is only a hint (it is wrong behind NAT). The first packet
that arrives on a side's local port fixes, or *latches*, that side's source address
and port; media for that side is then sent there (symmetric RTP, RFC 4961). Once
latched, packets from any other source are dropped and counted: this is what stops
the RTP bleed attack, where a stranger sprays a relay's ports and is answered with
the call's media, and RTP injection into a call. Re-latching on a new SSRC from a new
source is a policy knob, off by default, because it is exactly what bleed exploits.

A phone whose NAT binding moves mid-call (a mobile changing networks, a router that
reboots or times the binding out) sends from a new port, and strict source drops it
for the rest of the call: one-way audio. ``relatch_after_silence`` (off by default)
lets a new source take over once the latched one has been silent that long, after
:data:`RELATCH_PACKETS` packets in a row from it, SSRC or not (it covers UDPTL too).
Bleed needs the latched source silent for that long, not merely a new SSRC.

Pure: a `Latch` is a frozen value; `Latch.on_packet` returns the next one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

from sbc.media.values import Endpoint

#: Packets in a row from one new source that take a silent latch over.
RELATCH_PACKETS: Final = 3


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
    #: From a new source while the latched one is silent: not forwarded, but counted
    #: towards a relatch (relatch_after_silence).
    CANDIDATE = "candidate"
    #: From another source: drop and count.
    DROP = "drop"

    @property
    def forward(self) -> bool:
        return self is not LatchVerdict.DROP and self is not LatchVerdict.CANDIDATE


@dataclass(frozen=True)
class LatchPolicy:
    strict_source: bool = True
    relatch_on_new_ssrc: bool = False
    #: Seconds the latched source must have been silent before a new source may take
    #: it over (after RELATCH_PACKETS packets in a row); 0: never.
    relatch_after_silence: float = 0.0


@dataclass(frozen=True)
class Latch:
    """The learnt source of one side's packets on one local port."""

    state: LatchState = LatchState.UNLATCHED
    source: Endpoint | None = None
    ssrc: int | None = None
    #: A new source heard while the latched one is silent, and its packets in a row.
    #: Not replicated: a standby starts counting afresh.
    candidate: Endpoint | None = None
    candidate_packets: int = 0

    def on_packet(
        self, source: Endpoint, ssrc: int | None, policy: LatchPolicy, silent_for: float = 0.0
    ) -> tuple[Latch, LatchVerdict]:
        """The latch after a packet from ``source`` (``ssrc`` None if not RTP/RTCP);
        ``silent_for``: seconds since the latched source was last heard."""
        if self.state is LatchState.UNLATCHED:
            return Latch(LatchState.LATCHED, source, ssrc), LatchVerdict.LATCHED
        if source == self.source:
            if self.candidate is not None:
                # Heard again: whoever was counting towards a relatch starts over.
                kept = self.ssrc if ssrc is None else ssrc
                return Latch(self.state, self.source, kept), LatchVerdict.ACCEPT
            if ssrc is not None and ssrc != self.ssrc:
                # Same source, new SSRC (RFC 3550 8.2 collision, a transfer behind a
                # PBX): the source is what we trust, follow the SSRC.
                return Latch(self.state, self.source, ssrc), LatchVerdict.ACCEPT
            return self, LatchVerdict.ACCEPT
        if policy.relatch_on_new_ssrc and ssrc is not None and ssrc != self.ssrc:
            return Latch(LatchState.LATCHED, source, ssrc), LatchVerdict.RELATCHED
        wait = policy.relatch_after_silence
        if wait and silent_for >= wait:
            count = self.candidate_packets + 1 if source == self.candidate else 1
            if count >= RELATCH_PACKETS:
                return Latch(LatchState.LATCHED, source, ssrc), LatchVerdict.RELATCHED
            latch = Latch(self.state, self.source, self.ssrc, source, count)
            return latch, LatchVerdict.CANDIDATE
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
