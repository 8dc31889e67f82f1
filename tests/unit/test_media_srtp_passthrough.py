"""SRTP the relay does not terminate (RTP/SAVP with the peers' a=crypto end to end).

The B2BUA does not terminate SDES-SRTP: the peers' keys cross in SDP and their
packets cross the relay encrypted. SRTCP is ciphertext past its first header, so
the relay's RTCP checks dropped every SRTCP packet; and SRTP's padding count sits
inside the ciphertext, so a padded packet failed the RTP padding check.
"""

from __future__ import annotations

import asyncio
import os
import struct

from sbc.b2bua.topology import leg_offers
from sbc.media.relay import MediaRelay
from sbc.media.session import LegOffer, LegState, MediaSession, Side
from sbc.sip.sdp import SessionDescription
from tests.unit.test_b2bua_topology import INSIDE as INSIDE_REALM
from tests.unit.test_media_relay import ATTACKER, PEER_A, PEER_B, RTP, leg, make_relay, offer, sent

SAVP_A = LegOffer("outside", remote=PEER_A, encrypted=True)
SAVP_B = LegOffer("inside", remote=PEER_B, encrypted=True)


def srtcp(ssrc: int = 0xA) -> bytes:
    """An SRTCP SR: its first 8 bytes in the clear, then ciphertext, E|index, tag."""
    return (
        struct.pack("!BBHI", 0x80, 200, 6, ssrc)
        + os.urandom(20)
        + b"\x80\x00\x00\x01"
        + (os.urandom(10))
    )


def passthrough() -> tuple[MediaRelay, MediaSession]:
    relay = make_relay()
    return relay, asyncio.run(relay.allocate("savp", offer(SAVP_A, SAVP_B)))


def test_srtcp_crosses_unparsed_and_latches_its_port() -> None:
    relay, session = passthrough()
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    packets = [srtcp() for _ in range(5)]
    for packet in packets:
        relay._packet(a, True, packet, (PEER_A.address.compressed, PEER_A.port + 1))
    assert [data for data, _ in sent(b, rtcp=True)] == packets
    assert a.rtcp_packets == 5 and a.dropped_other == 0
    assert a.state.rtcp_latch.latched
    assert a.monitor.quality == LegState("x", PEER_A).quality  # nothing to read in it
    # Not RTCP at all (second byte outside 192..223) is still dropped.
    relay._packet(a, True, RTP, (PEER_A.address.compressed, PEER_A.port + 1))
    assert a.dropped_other == 1


def test_padded_srtp_crosses_and_a_stranger_is_still_refused() -> None:
    relay, session = passthrough()
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    # P bit set; the last byte is the auth tag's, not a padding count that fits.
    padded = bytes([RTP[0] | 0x20]) + RTP[1:-1] + b"\xff"
    relay._packet(a, False, padded, PEER_A.sockaddr())
    assert sent(b) == [(padded, PEER_B.sockaddr())]
    relay._packet(a, False, RTP, ATTACKER.sockaddr())
    assert a.dropped_source == 1


def test_plain_rtp_legs_still_check_padding_and_parse_rtcp() -> None:
    relay = make_relay()
    session = asyncio.run(relay.allocate("plain", offer()))
    a = leg(relay, session, Side.A)
    padded = bytes([RTP[0] | 0x20]) + RTP[1:-1] + b"\xff"
    relay._packet(a, False, padded, PEER_A.sockaddr())
    relay._packet(a, True, srtcp(), (PEER_A.address.compressed, PEER_A.port + 1))
    assert a.dropped_other == 2


def test_leg_offers_mark_savp_media_and_the_state_round_trips() -> None:
    for proto, encrypted in (
        ("RTP/SAVP", True),
        ("RTP/SAVPF", True),
        ("UDP/TLS/RTP/SAVPF", True),
        ("RTP/AVP", False),
        ("udptl", False),
    ):
        body = (
            "v=0\r\no=- 1 1 IN IP4 203.0.113.9\r\ns=-\r\nc=IN IP4 203.0.113.9\r\n"
            f"t=0 0\r\nm=audio 4000 {proto} 0\r\n"
        )
        (made,) = leg_offers(SessionDescription.parse(body.encode()), INSIDE_REALM)
        assert made.encrypted is encrypted, proto
    state = LegState("x", PEER_A, encrypted=True)
    assert LegState.from_dict(state.to_dict()).encrypted
    old = state.to_dict()
    del old["encrypted"]
    assert not LegState.from_dict(old).encrypted
