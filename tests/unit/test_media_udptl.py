"""T.38 fax (ITU-T T.38 Annex D, RFC 3362: ``m=image <port> udptl t38``) through the
relay: UDPTL, and any ``UDP`` proto, is not RTP and is relayed as opaque datagrams.

A UDPTL packet starts with a 16-bit sequence number, so its first byte takes any
value: read as RTP, most would be dropped (version not 2) and the rest latched by
an "SSRC" that is fax data.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import sbc.media.relay as relay_module
from sbc.b2bua.topology import leg_offers
from sbc.media.latching import Latch, LatchPolicy
from sbc.media.session import LegOffer, LegState, MediaSession, Side
from sbc.media.values import Endpoint
from sbc.sip.sdp import SessionDescription
from tests.unit.test_b2bua_topology import INSIDE as INSIDE_REALM
from tests.unit.test_media_relay import (
    ATTACKER,
    PEER_A,
    PEER_B,
    RTP,
    leg,
    make_relay,
    offer,
    sent,
)

#: UDPTL packets (sequence number, then IFP data): first bytes of each RTP version.
UDPTL = (
    b"\x00\x01\x06\xd0\x22\x80\x00\x40" + bytes(range(24)),
    b"\x40\x02\x06\xd0\x22\x80\x00\x40" + bytes(range(30)),
    b"\xc3\x50\x0c\xc0\x01\x80\x00\x80" + b"\x55" * 20,
    # Looks like RTP version 2; its "SSRC" is fax data and changes every packet.
    b"\x80\x03\x06\xd0\x22\x80\x00\x40" + bytes(range(40)),
    b"\x81\x04\x06\xd0\xaa\xbb\xcc\xdd" + bytes(range(40, 80)),
)

UDPTL_A = LegOffer("outside", remote=PEER_A, rtp=False)
UDPTL_B = LegOffer("inside", remote=PEER_B, rtp=False)


@pytest.fixture
def no_rtp_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any RTP/RTCP parsing in the packet path fails the test."""

    def boom(*args: Any) -> Any:
        raise AssertionError("a UDPTL datagram was parsed as RTP/RTCP")

    for name in ("packet_ssrc", "rtp_fits", "is_rtcp", "parse_compound", "hide_sdes"):
        monkeypatch.setattr(relay_module, name, boom)


def udptl_session() -> tuple[relay_module.MediaRelay, MediaSession]:
    relay = make_relay()
    return relay, asyncio.run(relay.allocate("fax", offer(UDPTL_A, UDPTL_B)))


@pytest.mark.usefixtures("no_rtp_parsing")
def test_udptl_is_relayed_unchanged_both_ways_and_latched_on_the_source() -> None:
    relay, session = udptl_session()
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    for datagram in UDPTL:
        relay._packet(a, False, datagram, PEER_A.sockaddr())
    assert sent(b) == [(d, PEER_B.sockaddr()) for d in UDPTL]
    assert a.state.rtp_latch.source == PEER_A and a.state.rtp_latch.ssrc is None
    assert (a.packets, a.bytes) == (len(UDPTL), sum(map(len, UDPTL)))
    assert (a.dropped_other, a.dropped_source, a.rtcp_packets) == (0, 0, 0)
    relay._packet(b, False, UDPTL[2], PEER_B.sockaddr())
    assert sent(a) == [(UDPTL[2], PEER_A.sockaddr())]
    assert b.state.rtp_latch.source == PEER_B
    assert a.monitor.quality == b.monitor.quality == LegState("x", PEER_A).quality


@pytest.mark.usefixtures("no_rtp_parsing")
def test_a_strangers_udptl_after_latching_is_dropped() -> None:
    relay, session = udptl_session()
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    relay._packet(a, False, UDPTL[0], PEER_A.sockaddr())
    relay._packet(a, False, UDPTL[3], ATTACKER.sockaddr())
    assert (a.packets, a.dropped_source) == (1, 1)
    assert a.state.rtp_latch.source == PEER_A
    assert sent(b) == [(UDPTL[0], PEER_B.sockaddr())]


@pytest.mark.usefixtures("no_rtp_parsing")
def test_udptl_uses_one_port_the_rtcp_port_drops() -> None:
    relay, session = udptl_session()
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    relay._packet(a, True, UDPTL[1], PEER_A.sockaddr())
    assert (a.packets, a.rtcp_packets, a.dropped_other) == (0, 0, 1)
    assert not a.state.rtcp_latch.latched and not a.state.rtp_latch.latched
    assert sent(b) == sent(b, rtcp=True) == []


def test_a_udptl_stream_stays_out_of_the_kernel_path() -> None:
    relay, session = udptl_session()
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    relay._packet(a, False, UDPTL[0], PEER_A.sockaddr())
    relay._packet(b, False, UDPTL[1], PEER_B.sockaddr())
    assert a.state.rtp_latch.latched and b.state.rtp_latch.latched
    assert not a.stream.kernel_eligible()


def test_a_re_offer_switches_audio_to_t38_and_back() -> None:
    relay = make_relay()
    session = asyncio.run(relay.allocate("fax", offer()))
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    relay._packet(a, False, RTP, PEER_A.sockaddr())
    assert a.state.rtp_latch.ssrc == 0xA
    # The T.38 re-INVITE: the gateway keeps its address and port.
    fax = asyncio.run(relay.update(session.session_id, offer(UDPTL_A, UDPTL_B)))
    assert not fax.streams[0].a.rtp and not fax.streams[0].b.rtp
    for datagram in UDPTL:
        relay._packet(a, False, datagram, PEER_A.sockaddr())
    assert sent(b) == [(RTP, PEER_B.sockaddr())] + [(d, PEER_B.sockaddr()) for d in UDPTL]
    assert (a.packets, a.dropped_other, a.dropped_source) == (1 + len(UDPTL), 0, 0)
    # Back to audio once the fax is through.
    audio = asyncio.run(relay.update(session.session_id, offer()))
    assert audio.streams[0].a.rtp and audio.streams[0].b.rtp
    relay._packet(a, False, UDPTL[0], PEER_A.sockaddr())
    assert a.dropped_other == 1
    relay._packet(a, False, RTP, PEER_A.sockaddr())
    assert sent(b)[-1] == (RTP, PEER_B.sockaddr())


def test_leg_state_round_trips_the_proto_and_old_records_are_rtp() -> None:
    state = LegState(
        "outside",
        PEER_A,
        rtp=False,
        rtp_latch=Latch().on_packet(PEER_A, None, LatchPolicy())[0],
    )
    assert LegState.from_dict(state.to_dict()) == state
    old = state.to_dict()
    del old["rtp"]
    assert LegState.from_dict(old).rtp


@pytest.mark.parametrize(
    ("proto", "rtp"),
    [
        ("udptl", False),
        ("UDPTL", False),
        ("UDP", False),
        ("udp", False),
        ("RTP/AVP", True),
        ("RTP/AVPF", True),
        ("RTP/SAVP", True),
        ("RTP/SAVPF", True),
        ("UDP/TLS/RTP/SAVPF", True),
    ],
)
def test_leg_offers_tell_rtp_from_other_udp_media(proto: str, rtp: bool) -> None:
    media = "image" if proto.lower() == "udptl" else "audio"
    fmt = "t38" if media == "image" else "0"
    sdp = SessionDescription.parse(
        (
            "v=0\r\no=gw 1 2 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\n"
            f"t=0 0\r\nm={media} 40000 {proto} {fmt}\r\n"
        ).encode()
    )
    (leg_offer,) = leg_offers(sdp, INSIDE_REALM)
    assert leg_offer.rtp is rtp
    assert leg_offer.remote == Endpoint.of("198.51.100.9", 40000)
