"""The latching state machine: learn the source, then strict source."""

from __future__ import annotations

from sbc.media.latching import Latch, LatchPolicy, LatchState, LatchVerdict
from sbc.media.values import Endpoint

PEER = Endpoint.of("198.51.100.10", 34000)
NAT_REBIND = Endpoint.of("198.51.100.10", 34002)
ATTACKER = Endpoint.of("198.51.100.66", 34000)
STRICT = LatchPolicy()


def test_first_packet_latches_then_same_source_is_accepted() -> None:
    latch, verdict = Latch().on_packet(PEER, 0xA, STRICT)
    assert verdict is LatchVerdict.LATCHED
    assert latch == Latch(LatchState.LATCHED, PEER, 0xA)
    again, verdict = latch.on_packet(PEER, 0xA, STRICT)
    assert (again, verdict) == (latch, LatchVerdict.ACCEPT)


def test_strict_source_drops_other_sources_whatever_their_ssrc() -> None:
    latch, _ = Latch().on_packet(PEER, 0xA, STRICT)
    for source, ssrc in ((ATTACKER, 0xBAD), (ATTACKER, 0xA), (NAT_REBIND, 0xA)):
        after, verdict = latch.on_packet(source, ssrc, STRICT)
        assert (after, verdict) == (latch, LatchVerdict.DROP)
        assert not verdict.forward


def test_new_ssrc_from_the_latched_source_is_followed() -> None:
    latch, _ = Latch().on_packet(PEER, 0xA, STRICT)
    after, verdict = latch.on_packet(PEER, 0xB, STRICT)
    assert verdict is LatchVerdict.ACCEPT
    assert after.ssrc == 0xB and after.source == PEER


def test_relatch_on_new_ssrc_is_opt_in() -> None:
    policy = LatchPolicy(relatch_on_new_ssrc=True)
    latch, _ = Latch().on_packet(PEER, 0xA, policy)
    # Same SSRC from elsewhere: still dropped.
    assert latch.on_packet(ATTACKER, 0xA, policy)[1] is LatchVerdict.DROP
    after, verdict = latch.on_packet(NAT_REBIND, 0xC, policy)
    assert verdict is LatchVerdict.RELATCHED
    assert after == Latch(LatchState.LATCHED, NAT_REBIND, 0xC)


def test_non_strict_forwards_foreign_packets_without_moving_the_latch() -> None:
    policy = LatchPolicy(strict_source=False)
    latch, _ = Latch().on_packet(PEER, 0xA, policy)
    after, verdict = latch.on_packet(ATTACKER, 0xBAD, policy)
    assert (after, verdict) == (latch, LatchVerdict.ACCEPT_FOREIGN)


def test_latch_round_trips_through_a_dict() -> None:
    latch, _ = Latch().on_packet(Endpoint.of("2001:db8::10", 5000), 7, STRICT)
    assert Latch.from_dict(latch.to_dict()) == latch
    assert Latch.from_dict(Latch().to_dict()) == Latch()
