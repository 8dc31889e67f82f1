"""Topology hiding: keep-lists and the SDP rewrite towards the media relay."""

from __future__ import annotations

from ipaddress import ip_address

from sbc.b2bua.call import CallLeg
from sbc.b2bua.realm import Realm
from sbc.b2bua.topology import (
    contact_for,
    copy_kept_headers,
    leg_offers,
    rewrite_sdp,
    via_for,
)
from sbc.media.session import LegState, MediaSession, MediaStream, Side
from sbc.media.values import Direction, Endpoint
from sbc.sip.message import Headers, Request
from sbc.sip.sdp import Direction as SdpDirection
from sbc.sip.sdp import SessionDescription
from sbc.transport.base import Destination, ListenAddress, Transport

INSIDE = Realm.build(
    "inside", [ListenAddress(Transport.UDP, "203.0.113.1", 5060)], "203.0.113.1", ["subject"]
)

OFFER = (
    b"v=0\r\n"
    b"o=alice 1 1 IN IP4 198.51.100.9\r\n"
    b"s=-\r\n"
    b"c=IN IP4 198.51.100.9\r\n"
    b"t=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0\r\n"
    b"a=rtcp:40001 IN IP4 198.51.100.9\r\n"
    b"a=candidate:1 1 UDP 2130706431 198.51.100.9 40000 typ host\r\n"
    b"a=sendonly\r\n"
    b"m=video 40002 RTP/AVP 96\r\n"
)

SESSION = MediaSession(
    session_id="s",
    call_id="c",
    streams=(
        MediaStream(
            0,
            a=LegState("outside", Endpoint.of("198.51.100.1", 20000)),
            b=LegState("inside", Endpoint.of("203.0.113.1", 21000)),
        ),
    ),
    created=0.0,
)

LEG = CallLeg(
    realm="inside",
    call_id="b",
    local_tag="t",
    local=INSIDE.listen[0],
    peer=Destination(Transport.UDP, "203.0.113.5", 5060),
    sdp_session="777",
)


def test_only_kept_headers_cross_and_never_generated_ones() -> None:
    source = Request(
        "INVITE",
        "sip:1000@198.51.100.1",
        Headers(
            [
                ("Subject", "hello"),
                ("X-Internal", "10.0.0.1"),
                ("Via", "SIP/2.0/UDP 198.51.100.9;branch=z9hG4bKx"),
                ("Contact", "<sip:alice@198.51.100.9>"),
            ]
        ),
    )
    target = Request("INVITE", "sip:1000@203.0.113.5", Headers())
    everything = Realm.build("x", [], "203.0.113.1", ["Subject", "X-Internal", "Via", "Contact"])
    assert copy_kept_headers(source, target, INSIDE) == 1
    assert list(target.headers) == [("Subject", "hello")]
    target = Request("INVITE", "sip:1000@203.0.113.5", Headers())
    copy_kept_headers(source, target, everything)
    # Via and Contact are always the SBC's own, whatever a keep-list says.
    assert [name for name, _ in target.headers] == ["Subject", "X-Internal"]


def test_sdp_names_the_relay_only() -> None:
    body, leg = rewrite_sdp(SessionDescription.parse(OFFER), SESSION, Side.B, LEG)
    text = body.decode()
    assert "198.51.100" not in text
    assert "o=sbc 777 1 IN IP4 203.0.113.1\r\n" in text
    assert "c=IN IP4 203.0.113.1\r\n" in text
    assert "m=audio 21000 RTP/AVP 0\r\n" in text
    assert "a=rtcp:21001 IN IP4 203.0.113.1\r\n" in text
    assert "a=candidate" not in text
    assert "a=sendonly" in text
    # A second stream the relay has no ports for is rejected, not leaked.
    assert "m=video 0 RTP/AVP 96\r\n" in text
    assert leg.sdp_version == 1


def test_sdp_version_moves_only_when_the_sdp_changes() -> None:
    sdp = SessionDescription.parse(OFFER)
    _, leg = rewrite_sdp(sdp, SESSION, Side.B, LEG)
    again, leg2 = rewrite_sdp(sdp, SESSION, Side.B, leg)
    assert leg2.sdp_version == 1 and b"o=sbc 777 1 " in again
    changed, leg3 = rewrite_sdp(sdp.with_direction(SdpDirection.SENDRECV), SESSION, Side.B, leg2)
    assert leg3.sdp_version == 2 and b"o=sbc 777 2 " in changed


def test_leg_offers_read_the_peer_media() -> None:
    offers = leg_offers(SessionDescription.parse(OFFER), INSIDE)
    assert offers[0].remote == Endpoint(ip_address("198.51.100.9"), 40000)
    assert offers[0].direction is Direction.SENDONLY
    assert offers[0].realm == "inside" and offers[0].family == 4


def test_via_and_contact_name_the_listener() -> None:
    tcp = ListenAddress(Transport.TCP, "2001:db8::1", 5062)
    assert via_for(tcp, "z9hG4bKabc") == "SIP/2.0/TCP [2001:db8::1]:5062;branch=z9hG4bKabc;rport"
    assert contact_for(tcp) == "<sip:[2001:db8::1]:5062;transport=tcp>"


def test_a_keep_list_never_copies_what_the_b2bua_runs_per_leg() -> None:
    # Session timers, reliable provisionals, option tags and subscriptions are the
    # B2BUA's own on each leg (it adds or copies them itself): a keep-list naming
    # them would send a second, conflicting copy.
    owned = ["Session-Expires", "Min-SE", "Supported", "Require", "RSeq", "Event"]
    source = Request(
        "INVITE",
        "sip:1000@198.51.100.1",
        Headers([("Subject", "hi"), *((name, "x") for name in owned), ("x", "90")]),
    )
    target = Request("INVITE", "sip:1000@203.0.113.5", Headers())
    realm = Realm.build("x", [], "203.0.113.1", ["Subject", *owned, "Session-Expires"])
    assert copy_kept_headers(source, target, realm) == 1
    assert list(target.headers) == [("Subject", "hi")]


def test_the_keep_list_s_refusals_are_the_header_rules_ones() -> None:
    from sbc.b2bua.manipulation import OWNED_HEADERS, PROTECTED_HEADERS
    from sbc.b2bua.topology import GENERATED_HEADERS, PER_LEG_HEADERS

    assert frozenset(OWNED_HEADERS) == PER_LEG_HEADERS
    assert PROTECTED_HEADERS == GENERATED_HEADERS | PER_LEG_HEADERS
