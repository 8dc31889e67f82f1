"""Tests for sbc.sip.sdp: round trip on vectors, parsed views, SBC edits, errors, caps."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.sip.sdp import (
    DTLS_ATTRIBUTE_NAMES,
    ICE_ATTRIBUTE_NAMES,
    MAX_MEDIA_SECTIONS,
    MAX_SDP_LINES,
    SDES_ATTRIBUTE_NAMES,
    Attribute,
    Bandwidth,
    Codec,
    Connection,
    Direction,
    Field,
    MediaDescription,
    Origin,
    RtcpAttribute,
    SdpError,
    SessionDescription,
    Timing,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
SDP_VECTORS = sorted((VECTORS / "sdp").glob("*.sdp"))
RFC5118_SDP = [
    VECTORS / "sip-torture" / "rfc5118" / n for n in ("ipv6-in-sdp.dat", "mult-ip-in-sdp.dat")
]


def load(name: str) -> bytes:
    return (VECTORS / "sdp" / name).read_bytes()


def parse(name: str) -> SessionDescription:
    return SessionDescription.parse(load(name))


def crlf(*lines: str) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode()


def lines_of(sdp: SessionDescription) -> list[str]:
    data = bytes(sdp).decode()
    assert data.endswith(sdp.line_ending)
    return data.split(sdp.line_ending)[:-1]


MINIMAL = crlf(
    "v=0",
    "o=- 1 1 IN IP4 192.0.2.1",
    "s=-",
    "c=IN IP4 192.0.2.1",
    "t=0 0",
    "m=audio 4000 RTP/AVP 0",
    "a=rtpmap:0 PCMU/8000",
)


# -- round trip ------------------------------------------------------------------------


def test_vector_folder_is_populated() -> None:
    # Guards the parametrized round trip below from passing on an empty glob.
    assert len(SDP_VECTORS) >= 9


@pytest.mark.parametrize("path", SDP_VECTORS, ids=lambda p: p.name)
def test_vector_round_trips_byte_exact(path: Path) -> None:
    data = path.read_bytes()
    sdp = SessionDescription.parse(data)
    assert bytes(sdp) == data
    expected_ending = "\r\n" if b"\r\n" in data else "\n"
    assert sdp.line_ending == expected_ending
    # Parsing the output again gives the same model.
    assert SessionDescription.parse(bytes(sdp)) == sdp


@pytest.mark.parametrize("path", RFC5118_SDP, ids=lambda p: p.name)
def test_rfc5118_message_bodies_round_trip(path: Path) -> None:
    message = path.read_bytes()
    separator = b"\r\n\r\n" if b"\r\n\r\n" in message else b"\n\n"
    body = message.split(separator, 1)[1]
    assert bytes(SessionDescription.parse(body)) == body


def test_bare_lf_body_round_trips_to_bare_lf() -> None:
    data = MINIMAL.replace(b"\r\n", b"\n")
    sdp = SessionDescription.parse(data)
    assert sdp.line_ending == "\n"
    assert bytes(sdp) == data
    assert b"\r" not in bytes(sdp.with_bumped_version())


def test_non_utf8_bytes_in_free_text_survive() -> None:
    data = MINIMAL.replace(b"s=-", b"s=Caf\xe9 \xff")
    sdp = SessionDescription.parse(data)
    assert bytes(sdp) == data


# -- leniency ---------------------------------------------------------------------------


def test_missing_final_line_ending_is_accepted_and_written() -> None:
    sdp = SessionDescription.parse(MINIMAL[:-2])
    assert bytes(sdp) == MINIMAL


def test_trailing_blank_lines_are_ignored() -> None:
    assert bytes(SessionDescription.parse(MINIMAL + b"\r\n\r\n")) == MINIMAL


def test_trailing_whitespace_and_runs_of_spaces_on_structured_lines_are_normalised() -> None:
    sloppy = (
        MINIMAL.replace(b"o=- 1 1 IN IP4 192.0.2.1", b"o=-  1 1 IN IP4 192.0.2.1 ")
        .replace(b"m=audio 4000 RTP/AVP 0", b"m=audio  4000 RTP/AVP 0\t")
        .replace(b"a=rtpmap:0 PCMU/8000", b"a=rtpmap:0 PCMU/8000  ")
    )
    sdp = SessionDescription.parse(sloppy)
    assert sdp.origin.sess_id == "1"
    assert sdp.media[0].port == 4000
    assert bytes(sdp) == MINIMAL


def test_single_space_session_name_is_kept() -> None:
    sdp = parse("legacy-hold-c0.sdp")
    assert sdp.session_name == " "
    assert b"\r\ns= \r\n" in bytes(sdp)


def test_out_of_grammar_order_lines_keep_their_place() -> None:
    data = crlf(
        "v=0",
        "o=- 1 1 IN IP4 192.0.2.1",
        "s=-",
        "t=0 0",
        "c=IN IP4 192.0.2.1",
        "x=unknown line type",
        "m=audio 4000 RTP/AVP 0",
        "a=ptime:20",
        "c=IN IP4 192.0.2.9",
        "t=0 0",
    )
    sdp = SessionDescription.parse(data)
    assert bytes(sdp) == data
    assert sdp.connection == Connection("IN", "IP4", "192.0.2.1")
    assert sdp.media[0].connection == Connection("IN", "IP4", "192.0.2.9")
    # t= inside a media section is out of place and kept as text where it stands.
    assert sdp.media[0].lines[-1] == Field("t", "0 0")
    assert Field("x", "unknown line type") in sdp.lines


# -- parsed views -----------------------------------------------------------------------


def test_desk_phone_offer_fields() -> None:
    sdp = parse("desk-phone-g711-offer.sdp")
    assert sdp.version == "0"
    assert sdp.origin == Origin("-", "1711537418", 1711537418, "IN", "IP4", "192.168.10.41")
    assert sdp.session_name == "Polycom IP Phone"
    assert sdp.connection == Connection("IN", "IP4", "192.168.10.41")
    assert sdp.timings == (Timing(0, 0),)
    (audio,) = sdp.media
    assert (audio.media, audio.port, audio.port_count, audio.proto) == (
        "audio",
        2222,
        None,
        "RTP/AVP",
    )
    assert audio.formats == ("0", "8", "18", "101")
    assert audio.codecs() == (
        Codec(0, "PCMU", 8000),
        Codec(8, "PCMA", 8000),
        Codec(18, "G729", 8000, None, "annexb=no"),
        Codec(101, "telephone-event", 8000, None, "0-15"),
    )
    assert audio.telephone_event_payload_type() == 101
    assert audio.find_attributes("ptime") == (Attribute("ptime", "20"),)
    assert sdp.direction(0) is Direction.SENDRECV
    assert not sdp.is_on_hold()


def test_static_payload_types_are_known_without_rtpmap() -> None:
    sdp = parse("srtp-sdes-offer.sdp")
    (audio,) = sdp.media
    assert audio.proto == "RTP/SAVP"
    assert audio.codecs() == (
        Codec(9, "G722", 8000, 1),
        Codec(8, "PCMA", 8000, 1),
        Codec(0, "PCMU", 8000, 1),
        Codec(101, "telephone-event", 8000, None, "0-16"),
    )
    assert audio.codec(9) == Codec(9, "G722", 8000, 1)
    assert audio.codec(18) is None
    assert [a.value for a in audio.find_attributes("crypto")] == [
        "1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4",
        "2 AES_CM_128_HMAC_SHA1_32 inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj|2^20|1:4",
    ]


def test_unknown_dynamic_format_without_rtpmap_is_skipped() -> None:
    media = MediaDescription.parse_media_line("audio 4000 RTP/AVP 96 0 foo")
    media = MediaDescription(
        media.media, media.port, media.proto, media.formats, None, (Attribute("rtpmap", "0 bogus"),)
    )
    # "96" has no rtpmap and is not static; the malformed rtpmap for 0 is skipped too.
    assert media.codecs() == ()


def test_linphone_offer_fields() -> None:
    sdp = parse("linphone-offer.sdp")
    assert sdp.find_attributes("ice-pwd") == (Attribute("ice-pwd", "31ec21eb38b2ec6d36e8dc7b"),)
    assert sdp.find_attributes("record") == (Attribute("record", "off"),)
    audio, video = sdp.media
    assert audio.codecs()[:3] == (
        Codec(96, "opus", 48000, 2, "useinbandfec=1"),
        Codec(97, "speex", 16000, None, "vbr=on"),
        Codec(98, "speex", 8000, None, "vbr=on"),
    )
    # PT 18 has an fmtp but no rtpmap: the static entry plus the fmtp.
    assert audio.codec(18) == Codec(18, "G729", 8000, 1, "annexb=yes")
    assert audio.telephone_event_payload_type() == 101
    assert audio.telephone_event_payload_type(8000) == 100
    assert audio.telephone_event_payload_type(16000) == 99
    assert audio.telephone_event_payload_type(44100) is None
    assert audio.rtcp == RtcpAttribute(7079, "IN", "IP4", "192.168.0.20")
    assert video.rtcp == RtcpAttribute(9079)
    assert video.telephone_event_payload_type() is None


def test_baresip_lf_offer_fields() -> None:
    sdp = parse("baresip-offer-lf.sdp")
    assert sdp.line_ending == "\n"
    assert sdp.session_direction is Direction.SENDRECV
    assert sdp.media[0].direction is None
    assert sdp.direction(0) is Direction.SENDRECV
    assert sdp.media[0].bandwidths == (Bandwidth("AS", 64),)
    assert sdp.media[0].codec(97) == Codec(97, "G7221", 16000, None, "bitrate=32000")


def test_webrtc_offer_fields() -> None:
    sdp = parse("webrtc-chrome-offer.sdp")
    assert sdp.origin.sess_id == "4611731400430051336"
    assert sdp.origin.sess_version == 2
    assert sdp.connection is None
    assert sdp.find_attributes("group") == (Attribute("group", "BUNDLE 0 1"),)
    assert sdp.find_attributes("msid-semantic") == (
        Attribute("msid-semantic", " WMS 8a9c3c21-6c4a-4d37-9e1b-3e0a9d2f3d1c"),
    )
    audio, video = sdp.media
    assert (audio.media, video.media) == ("audio", "video")
    assert audio.proto == "UDP/TLS/RTP/SAVPF"
    assert audio.is_rtp
    assert sdp.media_connection(1) == Connection("IN", "IP4", "203.0.113.7")
    assert audio.rtcp == RtcpAttribute(9, "IN", "IP4", "0.0.0.0")
    candidates = audio.find_attributes("candidate")
    assert len(candidates) == 3
    assert candidates[1].value is not None and "2001:db8:a0b:12f0::7" in candidates[1].value
    assert candidates[2].value is not None and " typ srflx raddr " in candidates[2].value
    assert audio.find_attributes("fingerprint")[0].value == (
        "sha-256 D2:FA:0E:C3:22:59:5E:14:95:69:92:3D:13:B4:84:24:"
        "2C:C2:A2:C0:3E:FD:34:8E:5E:EA:6F:AF:52:CE:E6:0F"
    )
    assert audio.find_attributes("setup") == (Attribute("setup", "actpass"),)
    assert audio.find_attributes("rtcp-mux") == (Attribute("rtcp-mux"),)
    assert audio.find_attributes("mid") == (Attribute("mid", "0"),)
    assert len(video.find_attributes("ssrc")) == 2
    assert audio.telephone_event_payload_type() == 110
    assert audio.telephone_event_payload_type(8000) == 126
    assert video.codecs()[1] == Codec(97, "rtx", 90000, None, "apt=96")


def test_ipv6_offer_fields() -> None:
    sdp = parse("ipv6-offer.sdp")
    assert sdp.origin == Origin("assistant", "971731711378798081", 0, "IN", "IP6", "2001:db8::20")
    assert sdp.connection == Connection("IN", "IP6", "2001:db8::20")
    assert sdp.bandwidths == (Bandwidth("AS", 512),)
    assert sdp.timings == (Timing(3338481189, 3370017201),)
    assert sdp.media[0].codecs() == (Codec(2, "G726-32", 8000),)


def test_t38_non_rtp_media_has_no_codecs() -> None:
    sdp = parse("t38-image-reoffer.sdp")
    audio, image = sdp.media
    assert audio.is_rejected
    assert (image.media, image.proto, image.formats) == ("image", "udptl", ("t38",))
    assert not image.is_rtp
    assert image.codecs() == ()
    # The rejected audio stream is not "on hold"; the image stream is active.
    assert not sdp.is_on_hold()


def test_multicast_connection_host_drops_ttl() -> None:
    assert Connection.parse("IN IP4 224.2.36.42/127/3").host == "224.2.36.42"


def test_property_attribute_and_empty_value_are_distinct() -> None:
    assert Attribute.parse("rtcp-mux") == Attribute("rtcp-mux", None)
    assert Attribute.parse("foo:") == Attribute("foo", "")
    assert str(Attribute("foo", "")) == "foo:"


def test_port_count_parses_and_serializes() -> None:
    media = MediaDescription.parse_media_line("video 49170/2 RTP/AVP 31")
    assert (media.port, media.port_count) == (49170, 2)
    assert str(media) == "video 49170/2 RTP/AVP 31"


def test_session_level_optional_fields() -> None:
    data = crlf(
        "v=0",
        "o=jdoe 2890844526 2890842807 IN IP4 10.47.16.5",
        "s=SDP Seminar",
        "i=A Seminar on the session description protocol",
        "u=http://www.example.com/seminars/sdp.pdf",
        "e=j.doe@example.com (Jane Doe)",
        "p=+1 617 555-6011",
        "c=IN IP4 224.2.17.12/127",
        "t=2873397496 2873404696",
        "r=7d 1h 0 25h",
        "z=2882844526 -1h 2898848070 0",
        "k=clear:secret",
        "a=recvonly",
        "m=audio 49170 RTP/AVP 0",
        "i=media title",
        "m=video 51372 RTP/AVP 99",
        "a=rtpmap:99 h263-1998/90000",
    )
    sdp = SessionDescription.parse(data)
    assert bytes(sdp) == data
    assert sdp.information == "A Seminar on the session description protocol"
    assert sdp.uri == "http://www.example.com/seminars/sdp.pdf"
    assert sdp.emails == ("j.doe@example.com (Jane Doe)",)
    assert sdp.phones == ("+1 617 555-6011",)
    assert sdp.repeat_times == ("7d 1h 0 25h",)
    assert sdp.time_zones == "2882844526 -1h 2898848070 0"
    assert sdp.encryption_key == "clear:secret"
    assert sdp.attributes == (Attribute("recvonly"),)
    assert sdp.direction(1) is Direction.RECVONLY
    assert sdp.media[0].lines == (Field("i", "media title"),)


# -- edits ------------------------------------------------------------------------------


def test_set_connection_address_rewrites_session_and_media_lines() -> None:
    sdp = parse("legacy-hold-c0.sdp").with_connection_address("203.0.113.10")
    lines = lines_of(sdp)
    assert lines[3] == "c=IN IP4 203.0.113.10"
    assert lines[6] == "c=IN IP4 203.0.113.10"
    assert lines.count("c=IN IP4 203.0.113.10") == 2


def test_set_connection_address_switches_to_ip6() -> None:
    sdp = parse("desk-phone-g711-offer.sdp").with_connection_address("2001:DB8:0:0::5")
    assert lines_of(sdp)[3] == "c=IN IP6 2001:db8::5"
    sdp = parse("ipv6-offer.sdp").with_connection_address(ipaddress.ip_address("192.0.2.8"))
    assert lines_of(sdp)[3] == "c=IN IP4 192.0.2.8"


def test_set_connection_address_adds_session_line_when_a_section_lacks_one() -> None:
    data = crlf("v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-", "t=0 0", "m=audio 4000 RTP/AVP 0")
    sdp = SessionDescription.parse(data).with_connection_address("198.51.100.1")
    assert lines_of(sdp) == [
        "v=0",
        "o=- 1 1 IN IP4 192.0.2.1",
        "s=-",
        "c=IN IP4 198.51.100.1",
        "t=0 0",
        "m=audio 4000 RTP/AVP 0",
    ]


def test_set_connection_address_on_webrtc_keeps_media_level_only() -> None:
    sdp = parse("webrtc-chrome-offer.sdp").with_connection_address("198.51.100.1")
    assert sdp.connection is None
    assert [m.connection for m in sdp.media] == [Connection("IN", "IP4", "198.51.100.1")] * 2


def test_media_connection_address_is_inserted_after_information_line() -> None:
    media = MediaDescription(
        "audio",
        4000,
        "RTP/AVP",
        ("0",),
        None,
        (
            Field("i", "title"),
            Attribute("ptime", "20"),
        ),
    ).with_connection_address("192.0.2.7")
    assert media.lines == (
        Field("i", "title"),
        Connection("IN", "IP4", "192.0.2.7"),
        Attribute("ptime", "20"),
    )


def test_set_connection_address_rejects_hostname() -> None:
    with pytest.raises(SdpError) as info:
        parse("desk-phone-g711-offer.sdp").with_connection_address("sbc.example.com")
    assert str(info.value) == "not an IP address: 'sbc.example.com'"


def test_origin_address_and_version_bump() -> None:
    sdp = parse("desk-phone-g711-offer.sdp").with_origin_address("2001:db8::1")
    assert lines_of(sdp)[1] == "o=- 1711537418 1711537419 IN IP6 2001:db8::1"
    same_version = parse("desk-phone-g711-offer.sdp").with_origin_address(
        "203.0.113.5", bump_version=False
    )
    assert lines_of(same_version)[1] == "o=- 1711537418 1711537418 IN IP4 203.0.113.5"


def test_bumped_version_increments_by_one() -> None:
    sdp = parse("webrtc-chrome-offer.sdp").with_bumped_version().with_bumped_version()
    assert lines_of(sdp)[1] == "o=- 4611731400430051336 4 IN IP4 127.0.0.1"


def test_replace_whole_origin_with_the_legs_own() -> None:
    leg_origin = Origin("sbc", "8061", 3, "IN", "IP4", "203.0.113.1")
    sdp = parse("linphone-offer.sdp").with_origin(leg_origin)
    assert lines_of(sdp)[:3] == ["v=0", "o=sbc 8061 3 IN IP4 203.0.113.1", "s=Talk"]
    assert lines_of(sdp.with_origin(leg_origin.next_version()))[1] == (
        "o=sbc 8061 4 IN IP4 203.0.113.1"
    )


def test_set_media_port_only_touches_that_section() -> None:
    sdp = parse("ipv6-offer.sdp").with_media_port(1, 30000)
    lines = lines_of(sdp)
    assert "m=audio 6000 RTP/AVP 2" in lines
    assert "m=video 30000 RTP/AVP 107" in lines


def test_set_media_port_rewrites_rtcp_port_and_address() -> None:
    sdp = parse("linphone-offer.sdp")
    sdp = sdp.with_media_port(0, 40000, rtcp_port=40001, rtcp_address="203.0.113.1")
    sdp = sdp.with_media_port(1, 40002, rtcp_port=40003)
    lines = lines_of(sdp)
    assert "m=audio 40000 RTP/AVP 96 97 98 0 8 18 101 99 100" in lines
    assert "a=rtcp:40001 IN IP4 203.0.113.1" in lines
    assert "m=video 40002 RTP/AVP 96 97" in lines
    assert "a=rtcp:40003" in lines
    assert "a=rtcp:7079 IN IP4 192.168.0.20" not in lines


def test_set_media_port_adds_address_to_bare_rtcp_attribute() -> None:
    video = parse("linphone-offer.sdp").media[1]
    assert video.with_port(5000, rtcp_address="2001:db8::9").rtcp == RtcpAttribute(
        9079, "IN", "IP6", "2001:db8::9"
    )


def test_set_media_port_leaves_rtcp_alone_unless_asked_and_never_adds_one() -> None:
    sdp = parse("linphone-offer.sdp").with_media_port(0, 40000)
    assert "a=rtcp:7079 IN IP4 192.168.0.20" in lines_of(sdp)
    desk = parse("desk-phone-g711-offer.sdp").with_media_port(0, 40000, rtcp_port=40001)
    assert not any(line.startswith("a=rtcp") for line in lines_of(desk))


def test_set_media_port_rejects_out_of_range() -> None:
    with pytest.raises(SdpError) as info:
        parse("desk-phone-g711-offer.sdp").with_media_port(0, 65536)
    assert str(info.value) == "port out of range: 65536"


def test_reject_media_stream_sets_port_zero_and_keeps_formats() -> None:
    data = MINIMAL.replace(b"m=audio 4000 RTP/AVP 0", b"m=audio 4000/2 RTP/AVP 0")
    sdp = SessionDescription.parse(data).with_media_rejected(0)
    assert "m=audio 0 RTP/AVP 0" in lines_of(sdp)
    assert sdp.media[0].is_rejected
    assert not sdp.is_on_hold()


def test_strip_ice_and_dtls_attributes_from_webrtc_offer() -> None:
    sdp = parse("webrtc-chrome-offer.sdp").without_attributes(
        ICE_ATTRIBUTE_NAMES | DTLS_ATTRIBUTE_NAMES
    )
    lines = lines_of(sdp)
    for prefix in (
        "a=candidate",
        "a=ice-",
        "a=fingerprint",
        "a=setup",
    ):
        assert not any(line.startswith(prefix) for line in lines), prefix
    assert "a=rtcp-mux" in lines
    assert "a=group:BUNDLE 0 1" in lines
    assert len(lines) == len(lines_of(parse("webrtc-chrome-offer.sdp"))) - 16


def test_strip_session_level_only_or_media_level_only() -> None:
    original = parse("linphone-offer.sdp")
    session_only = original.without_attributes(ICE_ATTRIBUTE_NAMES, media=False)
    assert not session_only.find_attributes("ice-pwd")
    assert len(session_only.media[0].find_attributes("candidate")) == 2
    media_only = original.without_attributes(ICE_ATTRIBUTE_NAMES, session=False)
    assert media_only.find_attributes("ice-pwd")
    assert not media_only.media[0].find_attributes("candidate")


def test_strip_crypto_by_predicate_and_by_single_name() -> None:
    original = parse("srtp-sdes-offer.sdp")
    by_predicate = original.without_attributes(
        lambda a: a.name in SDES_ATTRIBUTE_NAMES and (a.value or "").startswith("2 ")
    )
    assert [a.value[:2] for a in by_predicate.media[0].find_attributes("crypto") if a.value] == [
        "1 "
    ]
    by_name = original.without_attributes("crypto")
    assert not any(line.startswith("a=crypto") for line in lines_of(by_name))
    assert "a=ptime:20" in lines_of(by_name)


def test_direction_set_replaces_in_place() -> None:
    sdp = parse("desk-phone-g711-offer.sdp").with_direction(Direction.SENDONLY, 0)
    lines = lines_of(sdp)
    assert lines[-1] == "a=sendonly"
    assert "a=sendrecv" not in lines
    assert sdp.direction(0) is Direction.SENDONLY
    assert sdp.is_on_hold()


def test_direction_set_appends_when_absent() -> None:
    sdp = parse("legacy-hold-c0.sdp").with_direction(Direction.INACTIVE, 0)
    assert lines_of(sdp)[-1] == "a=inactive"


def test_direction_set_for_all_media_drops_session_level() -> None:
    sdp = parse("baresip-offer-lf.sdp").with_direction(Direction.RECVONLY)
    lines = lines_of(sdp)
    assert "a=sendrecv" not in lines
    assert lines[-1] == "a=recvonly"
    assert sdp.session_direction is None
    assert sdp.direction(0) is Direction.RECVONLY


def test_media_direction_overrides_session_direction() -> None:
    sdp = parse("baresip-offer-lf.sdp").with_direction(Direction.SENDONLY, 0)
    assert sdp.session_direction is Direction.SENDRECV
    assert sdp.direction(0) is Direction.SENDONLY
    assert sdp.is_media_on_hold(0)


def test_duplicate_direction_attributes_collapse_to_one() -> None:
    media = MediaDescription(
        "audio",
        1,
        "RTP/AVP",
        ("0",),
        None,
        (
            Attribute("sendonly"),
            Attribute("ptime", "20"),
            Attribute("recvonly"),
        ),
    )
    assert media.with_direction(Direction.INACTIVE).lines == (
        Attribute("inactive"),
        Attribute("ptime", "20"),
    )


def test_hold_detection() -> None:
    assert parse("desk-phone-hold-sendonly-reoffer.sdp").is_on_hold()
    assert parse("desk-phone-hold-sendonly-reoffer.sdp").direction(0) is Direction.SENDONLY
    legacy = parse("legacy-hold-c0.sdp")
    assert legacy.direction(0) is Direction.SENDRECV
    assert legacy.is_media_on_hold(0)
    assert legacy.is_on_hold()
    # Moving the legacy hold to a real address takes it off hold.
    assert not legacy.with_connection_address("192.0.2.4").is_on_hold()
    assert not parse("webrtc-chrome-offer.sdp").is_on_hold()
    # recvonly is not hold (RFC 3264 8.4 holds with sendonly or inactive).
    assert not parse("desk-phone-g711-offer.sdp").with_direction(Direction.RECVONLY).is_on_hold()


def test_hold_needs_every_active_stream_held() -> None:
    sdp = parse("ipv6-offer.sdp").with_direction(Direction.SENDONLY, 0)
    assert sdp.is_media_on_hold(0)
    assert not sdp.is_on_hold()
    assert sdp.with_direction(Direction.INACTIVE, 1).is_on_hold()


def test_with_formats_drops_per_format_attributes() -> None:
    video = parse("webrtc-chrome-offer.sdp").media[1].with_formats(["102", "103"])
    assert str(video) == "video 54400 UDP/TLS/RTP/SAVPF 102 103"
    names = [(a.name, (a.value or "").split(" ")[0]) for a in video.attributes]
    assert ("rtpmap", "96") not in names
    assert ("rtcp-fb", "96") not in names
    assert ("fmtp", "97") not in names
    assert ("rtpmap", "102") in names
    assert ("fmtp", "103") in names
    linphone_video = parse("linphone-offer.sdp").media[1].with_formats(["97"])
    assert Attribute("rtcp-fb", "* trr-int 1000") in linphone_video.attributes


def test_edits_leave_the_original_untouched() -> None:
    original = parse("desk-phone-g711-offer.sdp")
    original.with_connection_address("192.0.2.1").with_media_port(0, 1).with_bumped_version()
    assert bytes(original) == load("desk-phone-g711-offer.sdp")


def test_typical_sbc_rewrite_of_webrtc_offer() -> None:
    sdp = (
        parse("webrtc-chrome-offer.sdp")
        .with_origin(Origin("-", "77", 1, "IN", "IP4", "203.0.113.1"))
        .with_connection_address("203.0.113.1")
        .with_media_port(0, 20000, rtcp_port=20001, rtcp_address="203.0.113.1")
        .with_media_port(1, 20002, rtcp_port=20003, rtcp_address="203.0.113.1")
        .without_attributes(ICE_ATTRIBUTE_NAMES | DTLS_ATTRIBUTE_NAMES)
    )
    reparsed = SessionDescription.parse(bytes(sdp))
    assert reparsed == sdp
    assert reparsed.media[1].rtcp == RtcpAttribute(20003, "IN", "IP4", "203.0.113.1")
    assert b"192.168.1.7" not in bytes(sdp)
    assert b"2001:db8:a0b:12f0::7" not in bytes(sdp)


# -- errors -----------------------------------------------------------------------------


def error_of(data: bytes) -> SdpError:
    with pytest.raises(SdpError) as info:
        SessionDescription.parse(data)
    return info.value


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty SDP body"),
        (b"\r\n\r\n", "empty SDP body"),
        (b"o=- 1 1 IN IP4 192.0.2.1\r\n", "line 1: expected 'v=0'"),
        (b"v=1\r\no=- 1 1 IN IP4 192.0.2.1\r\n", "line 1: expected 'v=0'"),
        (MINIMAL.replace(b"s=-", b"s-"), "line 3: expected '<type>=<value>'"),
        (MINIMAL.replace(b"s=-", b""), "line 3: expected '<type>=<value>'"),
        (MINIMAL.replace(b"s=-", b"1=-"), "line 3: expected '<type>=<value>'"),
        (MINIMAL.replace(b"t=0 0", b"ab=0"), "line 5: expected '<type>=<value>'"),
        (MINIMAL.replace(b"o=- 1 1 IN IP4 192.0.2.1\r\n", b""), "missing o= line"),
        (MINIMAL.replace(b"s=-", b"o=- 2 2 IN IP4 192.0.2.2"), "duplicate o= line"),
        (MINIMAL.replace(b"o=- 1 1 IN IP4", b"o=- 1 IN IP4"), "o= line: expected 6 fields, got 5"),
        (MINIMAL.replace(b"o=- 1 1 IN", b"o=- 1 x IN"), "o= line: bad sess-version 'x'"),
        (
            MINIMAL.replace(b"c=IN IP4 192.0.2.1", b"c=IN 192.0.2.1"),
            "c= line: expected 3 fields, got 2",
        ),
        (MINIMAL.replace(b"m=audio 4000", b"m=audio x"), "m= line: bad port 'x'"),
        (MINIMAL.replace(b"m=audio 4000", b"m=audio 65536"), "m= line: bad port '65536'"),
        (MINIMAL.replace(b"m=audio 4000", b"m=audio 4000/x"), "m= line: bad port count 'x'"),
        (
            MINIMAL.replace(b"m=audio 4000 RTP/AVP 0", b"m=audio 4000"),
            "m= line: expected '<media> <port> <proto> <fmt> ...'",
        ),
        (MINIMAL.replace(b"t=0 0", b"b=AS64"), "b= line: expected '<bwtype>:<bandwidth>'"),
        (MINIMAL.replace(b"t=0 0", b"b=AS:lots"), "b= line: bad bandwidth 'lots'"),
        (MINIMAL.replace(b"t=0 0", b"t=0"), "t= line: expected '<start-time> <stop-time>'"),
        (MINIMAL.replace(b"t=0 0", b"t=0 never"), "t= line: bad time 'never'"),
        (MINIMAL.replace(b"a=rtpmap", b"a=:rtpmap"), "a= line: empty attribute name"),
        (MINIMAL.replace(b"s=-", b"s=a\rb"), "s= line: CR or LF in value"),
    ],
)
def test_parse_error_messages(data: bytes, message: str) -> None:
    error = error_of(data)
    assert str(error) == message
    assert error.status == 400
    assert isinstance(error, ValueError)


def test_bad_rtcp_attribute_is_reported_when_read() -> None:
    sdp = SessionDescription.parse(MINIMAL + b"a=rtcp:70000\r\n")
    with pytest.raises(SdpError) as info:
        _ = sdp.media[0].rtcp
    assert str(info.value) == "a=rtcp: bad port '70000'"
    sdp = SessionDescription.parse(MINIMAL + b"a=rtcp:1 IN IP4\r\n")
    with pytest.raises(SdpError) as info:
        sdp.with_media_port(0, 5000, rtcp_port=5001)
    assert str(info.value) == "a=rtcp: expected '<port> [<nettype> <addrtype> <address>]'"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Attribute("ptime", "20\r\na=inject"), "a= line: CR or LF in value"),
        (lambda: Attribute("a:b"), "a= line: bad attribute name 'a:b'"),
        (lambda: Field("s", "x\ny"), "s= line: CR or LF in value"),
        (lambda: Field("ss", "x"), "bad line type 'ss'"),
        (lambda: Origin("a b", "1", 1, "IN", "IP4", "192.0.2.1"), "o= line: bad field 'a b'"),
        (lambda: Connection("IN", "IP4", ""), "c= line: bad field ''"),
        (lambda: MediaDescription("audio", 70000, "RTP/AVP"), "port out of range: 70000"),
        (lambda: SessionDescription((), (), "\r"), "bad line ending '\\r'"),
    ],
)
def test_constructed_values_are_checked(build: object, message: str) -> None:
    assert callable(build)
    with pytest.raises(SdpError) as info:
        build()
    assert str(info.value) == message


def test_origin_property_on_model_without_origin() -> None:
    with pytest.raises(SdpError) as info:
        _ = SessionDescription((Field("v", "0"),)).origin
    assert str(info.value) == "missing o= line"


def test_with_origin_inserts_after_version_when_missing() -> None:
    sdp = SessionDescription((Field("v", "0"), Field("s", "-"))).with_origin(
        Origin("-", "1", 1, "IN", "IP4", "192.0.2.1")
    )
    assert lines_of(sdp) == ["v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-"]


# -- caps -------------------------------------------------------------------------------


def test_line_cap_allows_exactly_max_lines() -> None:
    filler = MAX_SDP_LINES - MINIMAL.count(b"\n")
    data = MINIMAL + b"a=x\r\n" * filler
    assert len(SessionDescription.parse(data).media[0].lines) == filler + 1
    # Without the final line ending, too.
    assert bytes(SessionDescription.parse(data[:-2])) == data


def test_line_cap_refuses_one_more_line_with_413() -> None:
    filler = MAX_SDP_LINES - MINIMAL.count(b"\n") + 1
    for data in (MINIMAL + b"a=x\r\n" * filler, MINIMAL + b"a=x\r\n" * filler + b"a=x"):
        error = error_of(data)
        assert str(error) == f"too many lines: more than {MAX_SDP_LINES}"
        assert error.status == 413


def test_media_section_cap_with_488() -> None:
    at_cap = MINIMAL + b"m=audio 0 RTP/AVP 0\r\n" * (MAX_MEDIA_SECTIONS - 1)
    assert len(SessionDescription.parse(at_cap).media) == MAX_MEDIA_SECTIONS
    error = error_of(at_cap + b"m=audio 0 RTP/AVP 0\r\n")
    assert str(error) == f"too many media sections: more than {MAX_MEDIA_SECTIONS}"
    assert error.status == 488


# -- property: parse(serialize(model)) is stable ------------------------------------------

_token = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":/"),
    min_size=1,
    max_size=8,
)
# Any text but CR, LF and lone surrogates (which UTF-8 cannot carry).
_free_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"),
    max_size=20,
)
# Trailing whitespace on a= lines is normalised away, so generated values have none.
_attribute = st.builds(Attribute, name=_token, value=st.none() | _free_text.map(str.rstrip))
_connection = st.builds(Connection, st.just("IN"), st.sampled_from(["IP4", "IP6"]), _token)
_media_line = (
    _attribute
    | _connection
    | st.builds(Bandwidth, _token, st.integers(0, 10**6))
    | st.builds(Field, st.sampled_from("ikx"), _free_text)
)
_media = st.builds(
    MediaDescription,
    media=_token,
    port=st.integers(0, 65535),
    proto=_token,
    formats=st.lists(_token, max_size=4).map(tuple),
    port_count=st.none() | st.integers(1, 4),
    lines=st.lists(_media_line, max_size=6).map(tuple),
)
_origin = st.builds(Origin, _token, _token, st.integers(0, 2**64), _token, _token, _token)
_session_line = (
    _attribute
    | _connection
    | st.builds(Timing, st.integers(0, 2**32), st.integers(0, 2**32))
    | st.builds(Field, st.sampled_from("siuepzk"), _free_text)
)


@given(
    origin=_origin,
    rest=st.lists(_session_line, max_size=6),
    media=st.lists(_media, max_size=4),
    line_ending=st.sampled_from(["\r\n", "\n"]),
)
def test_parse_of_serialized_model_is_stable(
    origin: Origin,
    rest: list[Attribute | Connection | Timing | Field],
    media: list[MediaDescription],
    line_ending: str,
) -> None:
    sdp = SessionDescription((Field("v", "0"), origin, *rest), tuple(media), line_ending)
    data = bytes(sdp)
    assert SessionDescription.parse(data) == sdp
    assert bytes(SessionDescription.parse(data)) == data
