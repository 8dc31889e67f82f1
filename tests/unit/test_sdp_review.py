"""Review of the SDP path: what of one realm's SDP reaches the other, and what the
parser lets through that is not an SdpError.

Each test names the defect it guards against; the inside peer is 10.0.0.5 /
pbx.inside.example, and none of it may reach the bytes ``rewrite_sdp`` sends.
"""

from __future__ import annotations

import pytest

from sbc.b2bua.call import CallLeg
from sbc.b2bua.controller import AllocateMedia
from sbc.b2bua.realm import Realm
from sbc.b2bua.topology import leg_offers, parse_sdp, rewrite_sdp
from sbc.media.session import LegState, MediaSession, MediaStream, Side
from sbc.media.values import Endpoint
from sbc.sip.message import Headers, Request
from sbc.sip.sdp import SdpError, SessionDescription
from sbc.transport.base import Destination, ListenAddress, Transport
from tests.unit.test_b2bua_flows import (
    CALLER,
    SDP,
    confirmed_call,
    controller,
    from_a,
    invite_text,
    receive,
    requests,
    session,
)

INSIDE_ADDRESS = "10.0.0.5"
INSIDE_HOST = "pbx.inside.example"


def relay_session(streams: int = 1) -> MediaSession:
    """A relay session of ``streams`` streams, each on the next port pair."""
    return MediaSession(
        "s",
        "c",
        tuple(
            MediaStream(
                index,
                LegState("outside", Endpoint.of("198.51.100.1", 20000 + 2 * index)),
                LegState("inside", Endpoint.of("203.0.113.1", 21000 + 2 * index)),
            )
            for index in range(streams)
        ),
        0.0,
    )


RELAY = relay_session()

LEG = CallLeg(
    "outside",
    "call",
    "tag",
    ListenAddress(Transport.UDP, "198.51.100.1", 5060),
    Destination(Transport.UDP, "198.51.100.7", 5060),
    sdp_session="4242",
)

OUTSIDE = Realm.build("outside", [], "198.51.100.1")

HEAD = (
    "v=0\r\n"
    f"o=pbxuser 77 1 IN IP4 {INSIDE_ADDRESS}\r\n"
    "s=-\r\n"
    f"c=IN IP4 {INSIDE_ADDRESS}\r\n"
    "t=0 0\r\n"
)


def relayed(body: str) -> str:
    """The SDP the SBC sends the outside for ``body`` received from the inside."""
    sdp = SessionDescription.parse(body.encode())
    sent, _ = rewrite_sdp(sdp, RELAY, Side.A, LEG)
    return sent.decode()


def assert_nothing_inside(sent: str) -> None:
    for secret in (INSIDE_ADDRESS, INSIDE_HOST, "pbxuser", "4001", "4003"):
        assert secret not in sent, f"{secret} leaked:\n{sent}"


def sdp_request(body: bytes, content_type: str | None) -> Request:
    headers = Headers([("Content-Type", content_type)] if content_type is not None else [])
    request = Request("INVITE", "sip:1000@198.51.100.1", headers)
    request.body = body
    return request


# -- leaks -------------------------------------------------------------------------------


def test_free_text_and_key_lines_do_not_cross() -> None:
    # RFC 8866 5.4-5.6: i= u= e= p= are the inside's own words, URI, user@host and
    # number; 5.12: k= is obsolete and MUST be discarded. Lines of unknown type (and
    # o=/C= out of place, kept as text by the parser) must not carry anything across.
    sent = relayed(
        "v=0\r\n"
        f"o=pbxuser 77 1 IN IP4 {INSIDE_ADDRESS}\r\n"
        "s=-\r\n"
        f"i=PBX {INSIDE_ADDRESS}\r\n"
        f"u=http://{INSIDE_HOST}/call\r\n"
        f"e=alice@{INSIDE_HOST}\r\n"
        "p=+1 555 0100 (pbxuser)\r\n"
        f"c=IN IP4 {INSIDE_ADDRESS}\r\n"
        "t=3034423619 3042462419\r\n"
        "r=604800 3600 0 90000\r\n"
        "z=2882844526 -1h\r\n"
        f"k=uri:http://{INSIDE_HOST}/key\r\n"
        f"x=vendor {INSIDE_ADDRESS}\r\n"
        "m=audio 4000 RTP/AVP 0\r\n"
        f"i=line 1 of {INSIDE_HOST}\r\n"
        "k=clear:inside-key\r\n"
        f"o=pbxuser 1 1 IN IP4 {INSIDE_ADDRESS}\r\n"
        f"C=IN IP4 {INSIDE_ADDRESS}\r\n"
        "a=sendrecv\r\n"
    )
    assert_nothing_inside(sent)
    assert "inside-key" not in sent
    # The lines that carry no identity stay, in grammar order.
    assert [line[:2] for line in sent.splitlines()] == [
        "v=", "o=", "s=", "c=", "t=", "r=", "z=", "m=", "a=",
    ]  # fmt: skip


def test_rtcp_of_a_rejected_or_surplus_stream_does_not_cross() -> None:
    # RFC 3605: a=rtcp names the inside's RTCP port and address. A section sent with
    # port 0 (rejected by the inside, or with no relay stream) kept it as received.
    sent = relayed(
        HEAD + "m=audio 4000 RTP/AVP 0\r\n"
        "m=video 0 RTP/AVP 96\r\n"
        f"a=rtcp:4001 IN IP4 {INSIDE_ADDRESS}\r\n"
        "m=audio 4002 RTP/AVP 0\r\n"
        f"a=rtcp:4003 IN IP4 {INSIDE_ADDRESS}\r\n"
    )
    assert_nothing_inside(sent)
    assert "m=video 0 RTP/AVP 96\r\n" in sent and "m=audio 0 RTP/AVP 0\r\n" in sent


def test_a_mux_offer_names_the_relays_rtcp_port_for_answerers_without_mux() -> None:
    # RFC 5761 5.1.3: an answerer that does not take rtcp-mux sends its RTCP to the
    # port of a=rtcp. Naming the relay's RTP port there sent that RTCP to the RTP
    # socket of a leg not in mux mode, where it passed for RTP: relayed without
    # hide_sdes, with the inside's CNAME. The relay's RTCP port is named now.
    sent = relayed(HEAD + "m=audio 4000 RTP/AVP 0\r\na=rtcp-mux\r\na=rtcp:4000\r\n")
    assert "a=rtcp-mux\r\n" in sent
    assert "a=rtcp:20001 IN IP4 198.51.100.1\r\n" in sent
    # RFC 8858: an offer that is rtcp-mux-only has no separate RTCP port to name.
    only = relayed(
        HEAD + "m=audio 4000 RTP/AVP 0\r\na=rtcp-mux\r\na=rtcp-mux-only\r\na=rtcp:4000\r\n"
    )
    assert "a=rtcp:20000 IN IP4 198.51.100.1\r\n" in only


def test_tcp_streams_are_rejected_and_port_counts_dropped() -> None:
    # The relay is UDP: an MSRP or BFCP stream over TCP anchored to a relay port
    # could never connect; it is rejected (port 0), as a stream without a relay
    # stream is. A port count (RFC 8866 5.14: 4000/2 is two RTP/RTCP pairs) would
    # name relay ports of another call: the relay gives a stream one pair.
    sdp = SessionDescription.parse(
        (
            HEAD + "m=message 7394 TCP/MSRP *\r\n"
            f"a=path:msrp://{INSIDE_HOST}:7394/x;tcp\r\n"
            "m=audio 4000/2 RTP/AVP 0\r\n"
        ).encode()
    )
    sent = rewrite_sdp(sdp, relay_session(2), Side.A, LEG)[0].decode()
    assert "m=message 0 TCP/MSRP *\r\n" in sent
    assert "m=audio 20002 RTP/AVP 0\r\n" in sent
    assert_nothing_inside(sent)


def test_hidden_attributes_are_matched_whatever_their_case() -> None:
    # RFC 5234 2.3: the quoted names of RFC 8839 ("candidate") and RFC 3605 ("rtcp")
    # match case-insensitively, so a=Candidate is a candidate to the far side.
    sent = relayed(
        HEAD + "m=audio 4000 RTP/AVP 0\r\n"
        f"a=Candidate:1 1 UDP 2130706431 {INSIDE_ADDRESS} 4000 typ host\r\n"
        f"a=SSRC:1 cname:pbxuser@{INSIDE_HOST}\r\n"
        f"a=RTCP:4001 IN IP4 {INSIDE_ADDRESS}\r\n"
    )
    assert_nothing_inside(sent)
    assert "a=rtcp:20001 IN IP4 198.51.100.1\r\n" in sent


def test_source_filter_and_msrp_path_do_not_cross() -> None:
    # RFC 4570 a=source-filter lists the inside's source addresses; RFC 4975 a=path
    # is msrp://host:port of the inside endpoint.
    sent = relayed(
        HEAD + "m=audio 4000 RTP/AVP 0\r\n"
        f"a=source-filter: incl IN IP4 * {INSIDE_ADDRESS}\r\n"
        "m=message 0 TCP/MSRP *\r\n"
        f"a=path:msrp://{INSIDE_HOST}:7394/iau39;tcp\r\n"
    )
    assert_nothing_inside(sent)


@pytest.mark.parametrize(
    "content_type",
    ["multipart/mixed;boundary=b", 'Multipart/Alternative; boundary="b"'],
)
def test_the_sdp_part_of_a_multipart_body_is_the_sdp(content_type: str) -> None:
    # SIP-I trunks send ISUP and SDP in multipart/mixed (RFC 3204), RFC 6442 location
    # adds PIDF-LO. The controller relayed a body parse_sdp did not call SDP as it
    # is (the inside's SDP crossed untouched), and an INVITE turned into a late offer
    # that failed at the ACK. The SDP part is the SDP: rewritten, it crosses alone.
    sdp_text = HEAD + "m=audio 4000 RTP/AVP 0\r\n"
    body = (
        b"--b\r\nContent-Type: application/ISUP;version=itu-t92+\r\n\r\n\x01\x02\r\n"
        b"--b\r\ncontent-type:Application/SDP\r\n\r\n" + sdp_text.encode() + b"\r\n--b--\r\n"
    )
    sdp = parse_sdp(sdp_request(body, content_type))
    assert sdp is not None and bytes(sdp) == sdp_text.encode()
    # LF-only parts too.
    lf = body.replace(b"\r\n", b"\n")
    parsed = parse_sdp(sdp_request(lf, content_type))
    assert parsed is not None and [m.port for m in parsed.media] == [4000]
    # A multipart body without SDP is not the SDP path's business.
    other = b"--b\r\nContent-Type: application/pidf+xml\r\n\r\n<presence/>\r\n--b--\r\n"
    assert parse_sdp(sdp_request(other, content_type)) is None


@pytest.mark.parametrize("content_type", ["multipart/mixed", "multipart/mixed;boundary=zz"])
def test_an_sdp_part_that_cannot_be_found_is_a_400(content_type: str) -> None:
    body = b"--b\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n--b--\r\n"
    with pytest.raises(SdpError) as info:
        parse_sdp(sdp_request(body, content_type))
    assert info.value.status == 400


def test_a_body_without_content_type_is_refused_not_passed_on() -> None:
    # RFC 3261 20.15: Content-Type MUST be present with a body; without it the body
    # (here the inside's SDP) was relayed as it is.
    body = (HEAD + "m=audio 4000 RTP/AVP 0\r\n").encode()
    with pytest.raises(SdpError, match="body without Content-Type") as info:
        parse_sdp(sdp_request(body, None))
    assert info.value.status == 400


def test_a_malformed_content_type_is_an_sdp_error() -> None:
    # Was a ParseError, which no parse_sdp caller expects (in-dialog requests went
    # unanswered).
    body = (HEAD + "m=audio 4000 RTP/AVP 0\r\n").encode()
    with pytest.raises(SdpError, match="bad media type") as info:
        parse_sdp(sdp_request(body, "application sdp"))
    assert info.value.status == 400


# -- hold --------------------------------------------------------------------------------

LEGACY_HOLD = (
    "v=0\r\n"
    f"o=pbxuser 77 2 IN IP4 {INSIDE_ADDRESS}\r\n"
    "s= \r\n"
    "c=IN IP4 0.0.0.0\r\n"
    "t=0 0\r\n"
    "m=audio 4000 RTP/AVP 0\r\n"
    "c=IN IP4 0.0.0.0\r\n"
)


def test_legacy_hold_reaches_the_other_side_as_hold() -> None:
    # RFC 3264 8.4: c=0.0.0.0 is the RFC 2543 hold. Replacing it with the relay's
    # address turned the hold into "send to me".
    sent = relayed(LEGACY_HOLD)
    assert_nothing_inside(sent)
    assert sent.count("c=IN IP4 0.0.0.0\r\n") == 2
    assert "m=audio 20000 RTP/AVP 0\r\n" in sent
    assert "o=sbc 4242 1 IN IP4 198.51.100.1\r\n" in sent


def test_unspecified_address_is_not_a_media_destination() -> None:
    # The relay sends to the hint until it latches: 0.0.0.0 as a destination is this
    # host itself (Linux), so the other side's RTP went to a local port.
    (offer,) = leg_offers(SessionDescription.parse(LEGACY_HOLD.encode()), OUTSIDE)
    assert offer.remote is None


# -- only SdpError -------------------------------------------------------------------------

DIGITS = "9" * 5000

NUMBERS = {
    "b=": HEAD + f"b=AS:{DIGITS}\r\n",
    "t=": "v=0\r\no=- 1 1 IN IP4 10.0.0.5\r\ns=-\r\nt=0 " + DIGITS + "\r\n",
    "o= version": f"v=0\r\no=- 1 {DIGITS} IN IP4 10.0.0.5\r\ns=-\r\nt=0 0\r\n",
    "m= port": HEAD + f"m=audio 0{DIGITS} RTP/AVP 0\r\n",
    "m= port count": HEAD + f"m=audio 4000/{DIGITS} RTP/AVP 0\r\n",
}


@pytest.mark.parametrize("name", sorted(NUMBERS))
def test_a_number_too_long_to_convert_is_an_sdp_error(name: str) -> None:
    # Python refuses int() of more than 4300 digits with a bare ValueError, which the
    # controller does not catch (it maps SdpError to a 4xx).
    with pytest.raises(SdpError, match="bad"):
        SessionDescription.parse(NUMBERS[name].encode())


def test_numbers_up_to_twenty_digits_still_parse() -> None:
    # RFC 3264 5: o= numbers fit a 64-bit signed integer; the cap is above that.
    top = f"v=0\r\no=- 1 {2**63 - 1} IN IP4 10.0.0.5\r\ns=-\r\nt=0 0\r\nb=AS:{'9' * 20}\r\n"
    sdp = SessionDescription.parse(top.encode())
    assert (sdp.origin.sess_version, sdp.bandwidths[0].bandwidth) == (2**63 - 1, 10**20 - 1)
    with pytest.raises(SdpError, match="b= line: bad bandwidth '1000000000000000000000'"):
        SessionDescription.parse(top.replace("9" * 20, str(10**21)).encode())


def test_a_long_rtcp_port_is_refused_at_parse() -> None:
    body = (HEAD + f"m=audio 4000 RTP/AVP 0\r\na=rtcp:{DIGITS}\r\n").encode()
    with pytest.raises(SdpError, match="a=rtcp: bad port"):
        parse_sdp(sdp_request(body, "application/sdp"))


def test_codecs_skip_a_format_too_long_to_convert() -> None:
    # The controller lists the offer's codecs for the CDR on every INVITE.
    sdp = SessionDescription.parse(
        (
            HEAD + f"m=audio 4000 RTP/AVP 0 {DIGITS} 8\r\n"
            f"a=rtpmap:{DIGITS} opus/48000/2\r\na=rtpmap:8 PCMA/{DIGITS}\r\n"
        ).encode()
    )
    assert [codec.payload_type for codec in sdp.media[0].codecs()] == [0]


def test_every_rtcp_attribute_is_checked_at_parse() -> None:
    # _sdp_of checked only the first a=rtcp of a section; rewrite_sdp parses each, so
    # a bad second one raised SdpError half-way through building the other leg.
    body = (HEAD + "m=audio 4000 RTP/AVP 0\r\na=rtcp:4001\r\na=rtcp:x\r\n").encode()
    with pytest.raises(SdpError, match="a=rtcp: bad port 'x'"):
        parse_sdp(sdp_request(body, "application/sdp"))
    cased = (HEAD + "m=audio 4000 RTP/AVP 0\r\na=RTCP:x\r\n").encode()
    with pytest.raises(SdpError, match="a=rtcp: bad port 'x'"):
        parse_sdp(sdp_request(cased, "application/sdp"))


ODD_BODIES = {
    "empty": b"",
    "blank lines only": b"\r\n\r\n",
    "CR only": HEAD.replace("\r\n", "\r").encode(),
    "LF only": HEAD.replace("\r\n", "\n").encode() + b"m=audio 4000 RTP/AVP 0\n",
    "mixed endings": b"v=0\no=- 1 1 IN IP4 10.0.0.5\r\ns=-\rc=IN IP4 10.0.0.5\nt=0 0\n",
    "trailing whitespace": HEAD.replace("\r\n", " \t\r\n").encode(),
    "no v=": HEAD.split("\r\n", 1)[1].encode(),
    "no o=": b"v=0\r\ns=-\r\nt=0 0\r\n",
    "no s= or t=": b"v=0\r\no=- 1 1 IN IP4 10.0.0.5\r\n",
    "two o=": (HEAD + "o=- 2 2 IN IP4 10.0.0.6\r\n").encode(),
    "duplicate c= and m=": (HEAD + "c=IN IP4 10.0.0.6\r\nm=audio 1 RTP/AVP 0\r\n" * 2).encode(),
    "not UTF-8": HEAD.replace("s=-", "s=\xff\xfe\x80").encode("latin-1"),
    "NUL": (HEAD + "a=tool:x\x00y\r\n").encode(),
    "port 65535": (HEAD + "m=audio 65535 RTP/AVP 0\r\n").encode(),
    "port 65536": (HEAD + "m=audio 65536 RTP/AVP 0\r\n").encode(),
    "negative port": (HEAD + "m=audio -1 RTP/AVP 0\r\n").encode(),
    "port range": (HEAD + "m=audio 49170/2 RTP/AVP 0\r\n").encode(),
    "bad port range": (HEAD + "m=audio 49170/ RTP/AVP 0\r\n").encode(),
    "IPv6 zone": (HEAD + "m=audio 4000 RTP/AVP 0\r\nc=IN IP6 fe80::1%eth0\r\n").encode(),
    "FQDN c=": HEAD.replace(INSIDE_ADDRESS, INSIDE_HOST).encode() + b"m=audio 1 RTP/AVP 0\r\n",
    "multicast c=": (HEAD + "m=audio 4000 RTP/AVP 0\r\nc=IN IP4 224.2.1.1/127/3\r\n").encode(),
    "thousands of m=": (HEAD + "m=audio 4000 RTP/AVP 0\r\n" * 1500).encode(),
    "too many lines": (HEAD + "a=x\r\n" * 3000).encode(),
    "unicode digits": (HEAD + "m=audio \u0664\u0660\u0660\u0660 RTP/AVP 0\r\n").encode(),
    "unicode space": (HEAD + "m=audio\u00a04000\u00a0RTP/AVP\u00a00\r\n").encode(),
}


@pytest.mark.parametrize("name", sorted(ODD_BODIES))
def test_odd_bodies_parse_or_raise_only_sdp_error(name: str) -> None:
    request = sdp_request(ODD_BODIES[name], "application/sdp")
    try:
        sdp = parse_sdp(request)
    except SdpError:
        return
    if sdp is not None and sdp.media:
        sent = rewrite_sdp(sdp, RELAY, Side.A, LEG)[0].decode("utf-8", "surrogateescape")
        assert_nothing_inside(sent)


MULTIPART = "multipart/mixed;boundary=unique-boundary-1"


def sip_i(sdp_text: str) -> str:
    return (
        "--unique-boundary-1\r\nContent-Type: application/ISUP;version=itu-t92+\r\n\r\n"
        "\x01\x10\x60\x01\x0a\x00\x02\x0a\x08\x03\x10\x09\x04\x00\x10\r\n"
        "--unique-boundary-1\r\nContent-Type: application/sdp\r\n\r\n"
        f"{sdp_text}\r\n--unique-boundary-1--\r\n"
    )


def test_a_sip_i_invite_and_re_invite_cross_with_their_sdp_alone() -> None:
    c = controller()
    text = invite_text(body=sip_i(SDP)).replace(
        "Content-Type: application/sdp", f"Content-Type: {MULTIPART}", 1
    )
    step = receive(c, text, CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    (invite,) = requests(c.media_allocated(allocate.call_ref, session(), 0.0), "INVITE")
    assert invite.headers.get("Content-Type") == "application/sdp"
    assert invite.body.startswith(b"v=0") and b"ISUP" not in bytes(invite)
    assert b"m=audio 21000 RTP/AVP 0" in invite.body

    c = controller()
    _, _, a_tag = confirmed_call(c)
    reoffer = from_a("INVITE", a_tag, 2, body=sip_i(SDP), content_type=MULTIPART)
    (relayed,) = requests(receive(c, reoffer, CALLER, 1.0), "INVITE")
    assert relayed.headers.get("Content-Type") == "application/sdp"
    assert b"ISUP" not in bytes(relayed) and b"unique-boundary" not in bytes(relayed)
