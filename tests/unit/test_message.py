"""Message model, parser and framer on real-world messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.sip.errors import ParseError
from sbc.sip.headers import Address, Via, canonical_name, header_key, split_list
from sbc.sip.message import Headers, Request, Response, make_response
from sbc.sip.parser import FramingError, Keepalive, StreamFramer, parse_message
from sbc.sip.uri import SipUri, TelUri, escape_user, parse_uri

MESSAGES = Path(__file__).parent.parent / "vectors" / "messages"
FILES = sorted(p.name for p in MESSAGES.glob("*.sip"))


def load(name: str) -> bytes:
    return (MESSAGES / name).read_bytes()


@pytest.mark.parametrize("name", FILES)
def test_real_messages_round_trip_byte_exact(name: str) -> None:
    data = load(name)
    assert bytes(parse_message(data)) == data


@pytest.mark.parametrize("name", FILES)
def test_real_messages_frame_identically_on_a_stream(name: str) -> None:
    data = load(name)
    framer = StreamFramer()
    items = []
    for i in range(0, len(data) * 2, 7):  # two copies, fed in 7-byte pieces
        items += list(framer.feed((data + data)[i : i + 7]))
    assert [bytes(m) for m in items if isinstance(m, Request | Response)] == [data, data]


def test_invite_fields() -> None:
    m = parse_message(load("invite-desk-phone.sip"))
    assert isinstance(m, Request)
    assert m.via.rport == "" and m.via.branch == "z9hG4bK-524287-1---5c5bd2a8b36cb2d1"
    assert m.from_.display_name == "Alice Desk"
    assert m.tokens("Allow")[:3] == ("INVITE", "ACK", "CANCEL")
    assert "X-cisco-serviceuri" in m.tokens("Supported")
    assert m.content_type is not None and m.content_type.essence == "application/sdp"
    assert m.body.startswith(b"v=0\r\n")


def test_several_values_across_lines_and_in_one_line() -> None:
    m = parse_message(load("register-linphone.sip"))
    assert m.headers.values("Accept") == [
        "application/sdp",
        "text/plain",
        "application/vnd.gsma.rcs-ft-http+xml",
    ]
    (contact,) = m.contacts
    assert contact.param("+sip.instance") == '"<urn:uuid:de3c6f6a-9a71-4d63-a9c7-2b7d1f1e0c41>"'
    # Authorization holds commas but is one value.
    assert len(m.headers.values("Authorization")) == 1
    bye = parse_message(load("bye-in-dialog.sip"))
    routes = bye.addresses("Route")
    assert [str(r.uri) for r in routes] == [
        "sip:203.0.113.10;lr;ftag=8e1e5c3f",
        "sip:198.51.100.1;lr",
    ]


def test_compact_forms_and_ipv6() -> None:
    m = parse_message(load("options-keepalive.sip"))
    assert m.call_id == "4f6a1c0e-options@2001:db8::5"
    assert m.to.uri == SipUri("sip", "203.0.113.10", port=5060)
    assert m.via.host == "[2001:db8::5]" and m.via.port == 5062
    assert m.tokens("Supported") == ("path", "outbound")
    assert m.headers.get("Content-Length") == "0"


def test_response_fields() -> None:
    m = parse_message(load("200-ok-asterisk.sip"))
    assert isinstance(m, Response)
    assert (m.status, m.reason) == (200, "OK")
    assert m.vias[0].received == "203.0.113.10" and m.vias[0].rport == "5060"
    assert m.to.tag == "as4f1b2c3d"
    assert m.headers.get("Session-Expires") == "1800;refresher=uas"


def test_headers_editing() -> None:
    h = Headers([("Via", "SIP/2.0/UDP a;branch=z9hG4bK1"), ("v", "SIP/2.0/UDP b;branch=z9hG4bK2")])
    assert h.values("via") == ["SIP/2.0/UDP a;branch=z9hG4bK1", "SIP/2.0/UDP b;branch=z9hG4bK2"]
    h.add("Via", "SIP/2.0/TCP top;branch=z9hG4bK0", first=True)
    assert h.get("Via") == "SIP/2.0/TCP top;branch=z9hG4bK0"
    assert h.pop_first_value("Via") == "SIP/2.0/TCP top;branch=z9hG4bK0"
    h.set("Via", "SIP/2.0/UDP only;branch=z9hG4bK9")
    assert h.fields("Via") == ["SIP/2.0/UDP only;branch=z9hG4bK9"]
    assert h.remove("via") == 1 and "Via" not in h
    h.add("call-id", "x")
    assert list(h) == [("Call-ID", "x")]


def test_pop_first_value_of_a_list_header() -> None:
    h = Headers([("Route", "<sip:a;lr>, <sip:b;lr>")])
    assert h.pop_first_value("Route") == "<sip:a;lr>"
    assert h.fields("Route") == ["<sip:b;lr>"]


def test_serializer_fixes_content_length() -> None:
    m = parse_message(load("bye-in-dialog.sip"))
    m.body = b"hello"
    assert b"Content-Length: 5\r\n\r\nhello" in bytes(m)
    m.set_body(b"v=0\r\n", "application/sdp")
    out = parse_message(bytes(m))
    assert out.body == b"v=0\r\n" and out.headers.get("Content-Type") == "application/sdp"


def test_make_response_copies_and_tags() -> None:
    req = parse_message(load("invite-desk-phone.sip"))
    assert isinstance(req, Request)
    resp = make_response(req, 486, to_tag="abc", headers=(("Retry-After", "30"),))
    parsed = parse_message(bytes(resp))
    assert isinstance(parsed, Response) and parsed.status == 486 and parsed.reason == "Busy Here"
    assert parsed.to.tag == "abc"
    assert parsed.headers.fields("Via") == req.headers.fields("Via")
    assert parsed.call_id == req.call_id and parsed.cseq == req.cseq
    trying = make_response(req, 100, to_tag="abc")
    assert trying.headers.get("To") == "<sip:1002@pbx.example.com>"


def test_names() -> None:
    assert header_key("i") == "call-id" and header_key("CALL-ID") == "call-id"
    assert canonical_name("www-authenticate") == "WWW-Authenticate"
    assert canonical_name("x-custom-thing") == "X-Custom-Thing"


def test_split_list_respects_quotes_and_angles() -> None:
    assert split_list('"a, b" <sip:x>, <sip:y;p=1,2>') == ['"a, b" <sip:x>', "<sip:y;p=1,2>"]


def test_uri_forms() -> None:
    u = parse_uri(
        "sips:alice:secret@[2001:db8::1]:5061;transport=tcp;lr?Subject=hi&Priority=urgent"
    )
    assert isinstance(u, SipUri) and u.secure
    assert (u.user, u.password, u.host, u.port) == ("alice", "secret", "[2001:db8::1]", 5061)
    assert u.transport == "tcp" and u.lr
    assert u.headers == (("Subject", "hi"), ("Priority", "urgent"))
    assert (
        str(u) == "sips:alice:secret@[2001:db8::1]:5061;transport=tcp;lr?Subject=hi&Priority=urgent"
    )
    t = parse_uri("tel:+1-201-555-0123;phone-context=example.com")
    assert isinstance(t, TelUri) and t.is_global and t.param("phone-context") == "example.com"
    assert str(u.with_params(transport=None, maddr="203.0.113.1")).startswith(
        "sips:alice:secret@[2001:db8::1]:5061;lr;maddr=203.0.113.1"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sip:", "bad URI: 'sip:'"),
        ("sip:user@host:99999", "bad port in URI host: '99999'"),
        ("sip:a b@host", "bad URI: 'sip:a b@host'"),
        ("sip:[::1", "bad IPv6 reference in URI host: '[::1'"),
        ("sip:256.1.1.1", "bad IPv4 address in URI host: '256.1.1.1'"),
        ("1sip:x", "bad URI: '1sip:x'"),
        ("sip:@host", "empty user in URI: 'sip:@host'"),
        ("sip:host;=x", "empty parameter in URI"),
    ],
)
def test_uri_errors(text: str, message: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_uri(text)
    assert str(info.value) == message
    assert info.value.status == 400


def test_via_forms() -> None:
    v = Via.parse("SIP / 2.0 / tcp  host.example : 5070 ; branch = z9hG4bKx ; received=1.2.3.4")
    assert (v.transport, v.host, v.port, v.branch, v.received) == (
        "TCP",
        "host.example",
        5070,
        "z9hG4bKx",
        "1.2.3.4",
    )
    assert str(v.with_param("rport", "5070")).endswith(";rport=5070")
    with pytest.raises(ParseError, match="bad Via"):
        Via.parse("SIP/2.0 host")


def test_address_forms() -> None:
    a = Address.parse("<sip:x@y>")
    assert a.display is None and a.tag is None
    assert str(a.with_param("tag", "t1")) == "<sip:x@y>;tag=t1"
    b = Address.parse("sip:x@y;tag=1")
    assert b.params == (("tag", "1"),) and not b.angle
    with pytest.raises(ParseError, match="missing '>'"):
        Address.parse('"x" <sip:x@y')


def test_framer_keepalives_and_garbage() -> None:
    framer = StreamFramer()
    assert list(framer.feed(b"\r\n\r\n")) == [Keepalive()]
    assert list(framer.feed(b"\r\n")) == []  # a pong, or the start of a ping
    data = load("options-keepalive.sip")
    items = list(framer.feed(data))  # the lone CRLF before it is skipped
    assert [type(i) for i in items] == [Request]
    items = list(framer.feed(b"GARBAGE WITHOUT HEADERS\r\nContent-Length: 0\r\n\r\n"))
    assert len(items) == 1 and isinstance(items[0], ParseError)
    assert not framer.broken  # framed, merely invalid: answer 400, keep going
    items = list(framer.feed(b"OPTIONS sip:x SIP/2.0\r\nl: -1\r\n\r\n"))
    assert len(items) == 1 and isinstance(items[0], FramingError)
    assert framer.broken and list(framer.feed(data)) == []


def test_framer_takes_a_read_full_of_pings_and_a_message_after_them() -> None:
    # 64 KB of pings in one read: each is one Keepalive, and the message after them
    # is framed (the head of the buffer is scanned per ping, not all of it: the
    # whole-buffer scan held the event loop 1.5 s for this read).
    data = load("options-keepalive.sip")
    items = list(StreamFramer().feed(b"\r\n\r\n" * 16384 + data))
    assert items.count(Keepalive()) == 16384
    assert [type(i) for i in items[16384:]] == [Request]


def test_framer_requires_content_length() -> None:
    data = load("options-keepalive.sip").replace(b"l: 0\r\n", b"")
    (item,) = StreamFramer().feed(data)
    assert isinstance(item, FramingError)
    assert str(item.error) == "missing Content-Length on a stream transport"


def test_framer_waits_for_the_body() -> None:
    data = load("200-ok-asterisk.sip")
    framer = StreamFramer()
    assert list(framer.feed(data[:-10])) == []
    (item,) = framer.feed(data[-10:])
    assert isinstance(item, Response) and bytes(item) == data


@given(st.text(min_size=1, max_size=40))
def test_an_escaped_user_makes_a_valid_uri_with_the_same_user(user: str) -> None:
    """Whatever a peer's user part unescapes to (CR, LF, '>', '@' ...), escaped again
    it stays one user part of one URI (no header or parameter injection)."""
    escaped = escape_user(user)
    assert not set(escaped) & set('\r\n <>@:"')
    uri = parse_uri(f"sip:{escaped}@192.0.2.1:5060")
    assert isinstance(uri, SipUri) and uri.host == "192.0.2.1" and uri.params == ()
    assert uri.user_unescaped == user


def test_escape_user_keeps_ordinary_users_as_they_are() -> None:
    assert escape_user("+4930123456") == "+4930123456"
    assert escape_user("alice.smith-1") == "alice.smith-1"
    assert escape_user("+4930123;phone-context=+49") == "+4930123;phone-context=+49"
    assert escape_user("a\r\nVia: x") == "a%0D%0AVia%3A%20x"
    # Bytes that were not UTF-8 come back as they came.
    uri = parse_uri("sip:%FF%FEx@192.0.2.1")
    assert isinstance(uri, SipUri) and uri.user_unescaped is not None
    assert escape_user(uri.user_unescaped) == "%FF%FEx"
