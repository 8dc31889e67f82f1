"""The one-pass SDP rewrite of the B2BUA gives what the SessionDescription edits give.

``rewrite_sdp`` builds the relayed SDP in one pass over the lines; ``reference``
below is the same rewrite as a chain of ``SessionDescription`` edits (how it was
written before), run on offers with ICE, a=rtcp, rtcp-mux, rejected and surplus
streams, media-level c= only, no c= at all, IPv6, and LF line endings.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace

import pytest

from sbc.b2bua.call import CallLeg
from sbc.b2bua.topology import HIDDEN_SDP_ATTRIBUTES, SDP_USERNAME, rewrite_sdp
from sbc.media.session import LegState, MediaSession, MediaStream, Side
from sbc.media.values import Endpoint
from sbc.sip.sdp import Direction, Origin, SdpError, SessionDescription
from sbc.transport.base import Destination, ListenAddress, Transport


def reference(
    sdp: SessionDescription, session: MediaSession, side: Side, leg: CallLeg
) -> tuple[bytes, CallLeg]:
    address = session.streams[0].leg(side).local.address
    # The session name never crosses: "-" (RFC 8866 5.3).
    named = re.sub(rb"(?m)^s=[^\r\n]*", b"s=-", bytes(sdp))
    sdp = SessionDescription.parse(named)
    out = sdp.without_attributes(HIDDEN_SDP_ATTRIBUTES).with_connection_address(address)
    for index, media in enumerate(out.media):
        if index >= len(session.streams):
            out = out.with_media_rejected(index)
            continue
        if media.is_rejected:
            continue
        local = session.streams[index].leg(side)
        only = media.find_attributes("rtcp-mux-only")
        rtcp = local.local.port if only else local.local.port + 1
        out = out.with_media_port(
            index, local.local.port, rtcp_port=rtcp, rtcp_address=local.local.address
        )
        # One port pair a relay stream: no port count.
        out = out.with_media(index, replace(out.media[index], port_count=None))
    placeholder = Origin(SDP_USERNAME, leg.sdp_session, 0, "IN", "IP4", "0.0.0.0").with_address(
        address
    )
    digest = hashlib.sha256(bytes(out.with_origin(placeholder))).hexdigest()[:16]
    version = leg.sdp_version if digest == leg.sdp_digest else leg.sdp_version + 1
    out = out.with_origin(replace(placeholder, sess_version=version))
    return bytes(out), replace(leg, sdp_version=version, sdp_digest=digest)


def session(*ports: tuple[str, int, str, int]) -> MediaSession:
    return MediaSession(
        "s",
        "c",
        tuple(
            MediaStream(i, LegState("a", Endpoint.of(ah, ap)), LegState("b", Endpoint.of(bh, bp)))
            for i, (ah, ap, bh, bp) in enumerate(ports)
        ),
        0.0,
    )


LEG = CallLeg(
    "b",
    "call",
    "tag",
    ListenAddress(Transport.UDP, "203.0.113.1", 5060),
    Destination(Transport.UDP, "203.0.113.5", 5060),
    sdp_session="4242",
)

ONE = session(("198.51.100.1", 20000, "203.0.113.1", 21000))
TWO = session(
    ("198.51.100.1", 20000, "203.0.113.1", 21000), ("198.51.100.1", 20002, "203.0.113.1", 21002)
)
SIX = session(("2001:db8::1", 30000, "2001:db8:1::1", 31000))

OFFERS = {
    "ice-rtcp-surplus": (
        "v=0\r\no=alice 1 1 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\n"
        "a=ice-ufrag:abcd\r\na=ice-pwd:secretsecretsecret\r\n"
        "m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n"
        "a=rtcp:40001 IN IP4 198.51.100.9\r\n"
        "a=candidate:1 1 UDP 2130706431 198.51.100.9 40000 typ host\r\na=ssrc:1 cname:a@b\r\n"
        "a=sendonly\r\nm=video 40002 RTP/AVP 96\r\n"
    ),
    "named-by-its-tool": (
        "v=0\r\no=root 1 1 IN IP4 198.51.100.9\r\ns=Asterisk PBX 18.2.0\r\n"
        "c=IN IP4 198.51.100.9\r\nt=0 0\r\na=tool:baresip 1.0.0\r\n"
        "a=msid-semantic: WMS stream\r\nm=audio 40000 RTP/AVP 0\r\n"
    ),
    "mux-media-c-only": (
        "v=0\r\no=- 5 7 IN IP4 198.51.100.9\r\ns= \r\nt=0 0\r\n"
        "m=audio 40000 RTP/AVP 8\r\nc=IN IP4 198.51.100.9\r\na=rtcp-mux\r\na=rtcp:40000\r\n"
        "m=audio 0 RTP/AVP 0\r\nc=IN IP4 198.51.100.9\r\n"
    ),
    "no-c-anywhere": "v=0\no=- 5 7 IN IP4 198.51.100.9\ns=-\nt=0 0\nm=audio 40000 RTP/AVP 0\n",
    "one-media-without-c": (
        "v=0\r\no=- 5 7 IN IP4 198.51.100.9\r\ns=-\r\nt=0 0\r\n"
        "m=audio 40000 RTP/AVP 0\r\nc=IN IP4 198.51.100.9\r\nm=audio 40002/2 RTP/AVP 0\r\n"
    ),
}


@pytest.mark.parametrize("name", sorted(OFFERS))
@pytest.mark.parametrize("relay", [ONE, TWO, SIX], ids=["one", "two", "ipv6"])
@pytest.mark.parametrize("side", [Side.A, Side.B])
def test_one_pass_rewrite_is_the_edit_chain(name: str, relay: MediaSession, side: Side) -> None:
    sdp = SessionDescription.parse(OFFERS[name].encode())
    body, leg = rewrite_sdp(sdp, relay, side, LEG)
    assert (body, leg) == reference(sdp, relay, side, LEG)
    # Sent again unchanged: same bytes, same version; changed: the version moves.
    again, leg2 = rewrite_sdp(sdp, relay, side, leg)
    assert (again, leg2) == (body, leg) == reference(sdp, relay, side, leg)
    held = sdp.with_direction(Direction.INACTIVE)
    assert rewrite_sdp(held, relay, side, leg) == reference(held, relay, side, leg)


def test_bad_rtcp_attribute_is_an_sdp_error_as_before() -> None:
    sdp = SessionDescription.parse(
        b"v=0\r\no=- 1 1 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\n"
        b"m=audio 40000 RTP/AVP 0\r\na=rtcp:x\r\n"
    )
    with pytest.raises(SdpError, match="a=rtcp: bad port 'x'"):
        rewrite_sdp(sdp, ONE, Side.B, LEG)
    with pytest.raises(SdpError, match="a=rtcp: bad port 'x'"):
        reference(sdp, ONE, Side.B, LEG)


def test_the_other_side_s_software_does_not_cross() -> None:
    sdp = SessionDescription.parse(OFFERS["named-by-its-tool"].encode())
    body, _ = rewrite_sdp(sdp, ONE, Side.B, LEG)
    assert b"s=-\r\n" in body
    for secret in (b"Asterisk", b"baresip", b"tool", b"msid-semantic", b"root"):
        assert secret not in body
