"""The latching state machine: learn the source, then strict source."""

from __future__ import annotations

from sbc.media.latching import RELATCH_PACKETS, Latch, LatchPolicy, LatchState, LatchVerdict
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


# -- relatch after silence (NAT rebinding) ---------------------------------------------

AFTER_SILENCE = LatchPolicy(relatch_after_silence=2.0)


def test_a_new_source_takes_over_a_silent_latch_after_three_packets_in_a_row() -> None:
    latch, _ = Latch().on_packet(PEER, 0xA, AFTER_SILENCE)
    verdicts = []
    for _ in range(RELATCH_PACKETS):
        latch, verdict = latch.on_packet(NAT_REBIND, 0xA, AFTER_SILENCE, silent_for=2.5)
        verdicts.append(verdict)
    # The first packets are not forwarded: one stray packet moves nothing.
    assert verdicts[:-1] == [LatchVerdict.CANDIDATE] * (RELATCH_PACKETS - 1)
    assert not LatchVerdict.CANDIDATE.forward
    assert verdicts[-1] is LatchVerdict.RELATCHED
    assert latch == Latch(LatchState.LATCHED, NAT_REBIND, 0xA)


def test_a_latch_heard_lately_is_not_taken_over() -> None:
    latch, _ = Latch().on_packet(PEER, 0xA, AFTER_SILENCE)
    for _ in range(10):
        after, verdict = latch.on_packet(ATTACKER, 0xBAD, AFTER_SILENCE, silent_for=1.9)
        assert (after, verdict) == (latch, LatchVerdict.DROP)


def test_without_the_knob_silence_changes_nothing() -> None:
    latch, _ = Latch().on_packet(PEER, 0xA, STRICT)
    for _ in range(10):
        after, verdict = latch.on_packet(NAT_REBIND, 0xA, STRICT, silent_for=3600.0)
        assert (after, verdict) == (latch, LatchVerdict.DROP)


def test_the_latched_source_heard_again_or_another_source_restarts_the_count() -> None:
    latch, _ = Latch().on_packet(PEER, 0xA, AFTER_SILENCE)
    latch, _ = latch.on_packet(NAT_REBIND, 0xA, AFTER_SILENCE, silent_for=3.0)
    latch, verdict = latch.on_packet(NAT_REBIND, 0xA, AFTER_SILENCE, silent_for=3.0)
    assert verdict is LatchVerdict.CANDIDATE and latch.candidate_packets == 2
    # The old source speaks: it keeps its latch, and the count starts over.
    latch, verdict = latch.on_packet(PEER, 0xA, AFTER_SILENCE)
    assert verdict is LatchVerdict.ACCEPT
    assert latch == Latch(LatchState.LATCHED, PEER, 0xA)
    # Two sources interleaved: neither gets three in a row.
    for _ in range(5):
        for source in (NAT_REBIND, ATTACKER):
            latch, verdict = latch.on_packet(source, 0xC, AFTER_SILENCE, silent_for=3.0)
            assert verdict is LatchVerdict.CANDIDATE
    assert latch.source == PEER


def test_a_source_without_ssrc_relatches_after_silence_too() -> None:
    # UDPTL (T.38) has no SSRC: silence is the only way its source can move.
    latch, _ = Latch().on_packet(PEER, None, AFTER_SILENCE)
    for _ in range(RELATCH_PACKETS):
        latch, verdict = latch.on_packet(NAT_REBIND, None, AFTER_SILENCE, silent_for=5.0)
    assert verdict is LatchVerdict.RELATCHED and latch.source == NAT_REBIND
    # Heard again without SSRC: the latch keeps what it had.
    again, verdict = latch.on_packet(NAT_REBIND, None, AFTER_SILENCE)
    assert verdict is LatchVerdict.ACCEPT and again.ssrc is None


def test_a_counting_candidate_is_not_replicated() -> None:
    latch, _ = Latch().on_packet(PEER, 0xA, AFTER_SILENCE)
    latch, _ = latch.on_packet(NAT_REBIND, 0xA, AFTER_SILENCE, silent_for=3.0)
    assert latch.candidate == NAT_REBIND
    assert Latch.from_dict(latch.to_dict()) == Latch(LatchState.LATCHED, PEER, 0xA)
